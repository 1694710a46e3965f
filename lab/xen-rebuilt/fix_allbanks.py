"""Edit Xen's ``mce.c`` so that ``mca_cap_init`` fills the bank mask it allocates (the effect
of upstream's 532988dccc): inside that function, the loop that sets a bit per bank names the
global mask, which is still the old (on the boot CPU: absent) one; it must name the newly
allocated local mask instead.  Refuses to run if the function does not look as expected."""
import re
import sys

path = sys.argv[1]
text = open(path).read()
start = text.index("static int mca_cap_init(")
end = text.index("\n}\n", start)
body = text[start:end]
m = re.search(r"struct mca_banks \*(\w+) = mcabanks_alloc\(", body)
calls = re.findall(r"mcabanks_set\(i, (\w+)\)", body)
if not m or calls != ["mca_allbanks"]:
    sys.exit(f"{path}: mca_cap_init is not the expected shape (local={m and m.group(1)}, set={calls})")
fixed = body.replace("mcabanks_set(i, mca_allbanks)", f"mcabanks_set(i, {m.group(1)})")
open(path, "w").write(text[:start] + fixed + text[end:])
print(f"{path}: mca_cap_init now sets its banks in '{m.group(1)}'")

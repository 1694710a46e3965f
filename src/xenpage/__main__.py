"""``python -m xenpage``: the ``xenpage`` command."""
from xenpage.cli.main import main

main()

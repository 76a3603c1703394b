"""`python -m medblip_edge.cli_export` == medblip-export (for environments without the console script)."""

from .cli import export_main

if __name__ == "__main__":
    export_main()

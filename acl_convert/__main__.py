"""``python -m acl_convert ...`` is ``acl-convert ...`` (the command line is the installed
``acl_convert_cli`` package)."""

from acl_convert_cli.main import run

if __name__ == "__main__":
    run()

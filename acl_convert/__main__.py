"""``python -m acl_convert ...`` is ``acl-convert ...``."""

from acl_convert_cli.main import run

if __name__ == "__main__":
    run()

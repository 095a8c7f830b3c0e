"""The ``acl-convert`` command line (installed as the ``acl_convert_cli`` package)."""

"""The framework's library: everything the commands share. The top-level *.py files are the commands (argument
parsing plus a call into this package), beside models.py, dataset.py and utils.py, which the design card keeps at the
top."""

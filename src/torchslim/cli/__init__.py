"""The ``torchslim`` command line: argument parsing and printing only."""

"""The ``blip`` command line: one module per subcommand, thin over library functions."""

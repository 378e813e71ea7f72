"""The files here are plain scripts that tests run in subprocesses; never import them."""

collect_ignore_glob = ["*.py"]

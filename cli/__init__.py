"""The command line: a thin typer app over rcengine's public API."""

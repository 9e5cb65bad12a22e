#!/usr/bin/env python3
"""Launcher: ``python cli.py ...`` runs the installed ``immunoprofile`` command."""

from immunoprofile.cli import main

if __name__ == "__main__":
    main()

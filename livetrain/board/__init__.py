"""The live training board: layout, callbacks and figures for board.py."""

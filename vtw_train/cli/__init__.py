"""The commands behind ``vtw-train`` and ``scripts/``: one module per command, typed configs."""

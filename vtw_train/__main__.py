"""``python -m vtw_train <command>``: the same as the ``vtw-train`` console command."""

from vtw_train.cli.main import main

main()

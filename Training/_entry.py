"""Shared start-up for the Training scripts: run as `python`, `torchrun` or inside Slicer.

`Slicer --no-main-window --python-script Training/x.py ARGS` gives the script
`sys.argv = [script, ARGS...]`, like `python`; inside Slicer the exit status is passed on with
`slicer.util.exit`, since a plain `sys.exit` there would not end the application with it.
"""
import sys


def run(main):
    code = main(sys.argv[1:])
    slicer = sys.modules.get("slicer")
    if slicer is not None and getattr(slicer, "app", None) is not None:
        slicer.util.exit(code)
    sys.exit(code)

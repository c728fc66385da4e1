"""``python -m hpcqml``: runs the command-line interface (:func:`hpcqml.cli.main`)."""
from hpcqml.cli import main
import sys
sys.exit(main())

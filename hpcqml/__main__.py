from hpcqml.cli import main
import sys
sys.exit(main())

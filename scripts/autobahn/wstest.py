# Python 2.7 launcher for Autobahn|Testsuite's `wstest`, installed with
# `pip install --target DIR` (see run.py). site.addsitedir, not PYTHONPATH,
# so that zope.interface's namespace .pth file in DIR is processed.
#
#   python2.7 scripts/autobahn/wstest.py DIR -m fuzzingclient -s spec.json
import site
import sys

site.addsitedir(sys.argv.pop(1))

from autobahntestsuite.wstest import run  # noqa: E402

sys.argv[0] = "wstest"
sys.exit(run())

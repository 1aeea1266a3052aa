"""Print a pip constraints file pinning each runtime dependency to the lower bound
pyproject.toml declares, so CI can prove the floors are true (scripts/min_deps.sh)."""

import re
import sys
import tomllib

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for requirement in project["dependencies"]:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\[\]-]+)\s*>=\s*([^,;\s]+).*", requirement)
    if match is None:
        sys.exit(f"min_deps: no lower bound to pin in {requirement!r}")
    name = match.group(1).split("[")[0]
    print(f"{name}=={match.group(2)}")

#!/usr/bin/env bash
# Make the intersphinx inventories of docs/conf.py, which the build reads
# instead of fetching them: the build has no network but the package indexes.
#
#   flask.inv, werkzeug.inv  built from the documentation sources in Flask's and
#                            Werkzeug's sdists (pip download), with their own
#                            docs/conf.py and the packages it names
#   python.inv               Python's own, from Debian's python3.11-doc package
#
# Run it from anywhere: bash docs/_inventories/make_inventories.sh
# Versions: FLASK_VERSION, WERKZEUG_VERSION, PYTHON_DOC (the Debian package).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
FLASK_VERSION=${FLASK_VERSION:-3.1.3}
WERKZEUG_VERSION=${WERKZEUG_VERSION:-3.1.9}
PYTHON_DOC=${PYTHON_DOC:-python3.11-doc}
WORK=$(mktemp -d /tmp/flask-websockets-inventories.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

python3 -m venv venv
venv/bin/python -m pip download -q --no-binary :all: --no-deps -d sdists \
    "flask==$FLASK_VERSION" "werkzeug==$WERKZEUG_VERSION"
for sdist in sdists/*.tar.gz; do tar -xzf "$sdist"; done
# What their docs/conf.py import: the Pallets theme, log-cabinet, sphinx-tabs, the projects themselves.
venv/bin/python -m pip install -q sphinx pallets-sphinx-themes sphinxcontrib-log-cabinet sphinx-tabs packaging \
    "./flask-$FLASK_VERSION" "./werkzeug-$WERKZEUG_VERSION"
# Their intersphinx cannot reach the network here: its warnings do not matter,
# the inventory lists their own objects.
venv/bin/python -m sphinx -q -b html "flask-$FLASK_VERSION/docs" flask-html 2>/dev/null || true
venv/bin/python -m sphinx -q -b html "werkzeug-$WERKZEUG_VERSION/docs" werkzeug-html 2>/dev/null || true
cp flask-html/objects.inv "$HERE/flask.inv"
cp werkzeug-html/objects.inv "$HERE/werkzeug.inv"

apt-get download "$PYTHON_DOC" >/dev/null
dpkg-deb -x "$PYTHON_DOC"_*.deb python-doc
cp "$(find python-doc -name objects.inv -path '*/html/*' | head -n 1)" "$HERE/python.inv"

for inventory in "$HERE"/*.inv; do
    head -n 3 "$inventory" | tail -n 2 | tr '\n' ' '
    echo "-> $(basename "$inventory")"
done

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
# Read the version without importing the module (its dependencies may not be installed yet).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "flask_websockets.py").read_text(), re.M).group(1)

setup(
    name="Flask-Websockets",
    version=VERSION,
    description="Raw WebSockets with a Flask-style API, on gevent and gevent-websocket",
    long_description=(HERE / "README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    license="MIT",
    py_modules=["flask_websockets"],
    python_requires=">=3.9",
    install_requires=[
        "flask>=2.3",  # Werkzeug >= 2.3: LocalProxy over a ContextVar, websocket rules
        "gevent>=23.9",  # oldest tested; 22.10 needs pkg_resources, gone from setuptools
        "gevent-websocket>=0.10.1",
    ],
    extras_require={
        "speedups": ["wsaccel>=0.6"],  # C unmasking for large messages; optional
        "browser": ["playwright>=1.40"],  # the browser tests; they drive Debian's chromium
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",  # a hang fails the test instead of the run
            "websocket-client>=1.6",
            "trustme>=1.0",  # certificates for the wss tests
            "gunicorn>=21",  # the gunicorn worker's test
            "redis>=4.5",  # the message queue's tests, against a real redis-server
            "websockets>=13",  # a real client that offers permessage-deflate, as browsers do
            "prometheus_client>=0.17",  # the metrics' scrapes
        ],
        "redis": ["redis>=4.5"],  # the message queue (WEBSOCKETS_MESSAGE_QUEUE, Publisher)
        "metrics": ["prometheus_client>=0.17"],  # WEBSOCKETS_METRICS
        # The documentation site: python -m sphinx -W -b html docs docs/_build/html (Python 3.10+)
        "docs": ["sphinx>=7.3", "pallets-sphinx-themes>=2.5"],
    },
    classifiers=[
        "Framework :: Flask",
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Internet :: WWW/HTTP :: WSGI",
    ],
)

import os
import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# Read the version without importing the module (its dependencies may not be installed yet).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "flask_websockets.py").read_text(), re.M).group(1)


class BuildTypedPackage(build_py):
    """Install the module flask_websockets.py as the package flask_websockets/, typed.

    Type checkers take the types of an installed distribution only from a
    package with a py.typed marker (PEP 561); a single-file module has nowhere
    to put one, and mypy then sees nothing ("missing library stubs or py.typed
    marker"). The repository keeps the one file people vendor, and the wheel
    installs it as flask_websockets/__init__.py next to an empty py.typed:
    `import flask_websockets` gives the same module either way.

    An editable install (pip install -e .) imports the module from the work
    tree through setuptools' import hook, which type checkers cannot follow.
    With `--config-settings editable_mode=strict` it installs links laid out
    as here instead (build/__editable__.*/flask_websockets/__init__.py, a
    symbolic link to flask_websockets.py), and mypy sees the types.
    """

    def get_module_outfile(self, build_dir, package, module):
        if module == "flask_websockets" and list(package) in ([], [""]):
            return os.path.join(build_dir, "flask_websockets", "__init__.py")
        return super().get_module_outfile(build_dir, package, module)

    def run(self):
        # pip builds in the work tree's build/, and a wheel takes all of build/lib: a
        # flask_websockets.py left by a build before this layout would be installed too.
        stale = os.path.join(self.build_lib, "flask_websockets.py")
        if os.path.exists(stale):
            os.remove(stale)
        super().run()  # (which builds nothing in an editable install: the marker is still needed there)
        marker = self._marker()
        self.mkpath(os.path.dirname(marker))
        with open(marker, "w", encoding="utf-8"):
            pass  # empty: the whole package is typed

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), self._marker()]

    def _marker(self):
        return os.path.join(self.build_lib, "flask_websockets", "py.typed")


setup(
    name="Flask-Websockets",
    version=VERSION,
    description="Raw WebSockets with a Flask-style API, on gevent and gevent-websocket",
    long_description=(HERE / "README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    license="MIT",
    py_modules=["flask_websockets"],  # installed as a typed package: see BuildTypedPackage
    cmdclass={"build_py": BuildTypedPackage},
    python_requires=">=3.9",
    install_requires=[
        "flask>=2.3",  # Werkzeug >= 2.3: LocalProxy over a ContextVar, websocket rules
        "gevent>=23.9",  # oldest tested; 22.10 needs pkg_resources, gone from setuptools
        "gevent-websocket>=0.10.1",
    ],
    extras_require={
        "speedups": ["websockets>=13"],  # its C apply_mask unmasks large messages 60 times faster; optional
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
        "Typing :: Typed",
    ],
)

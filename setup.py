from setuptools import setup

from loom import __version__

setup(
    name="loom-streams",
    version=__version__,
    description="A small, sharp server for live data streams",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["loom", "loom.cli", "loom.store", "loom.web", "twisted.plugins"],
    install_requires=[
        # loom/web/channel.py relies on HTTPChannel internals tested on 26.10.
        "Twisted>=26.10,<27",
        "treq>=24.9",
        "PyYAML>=6.0",
        "colorama>=0.4.6",
        # /metrics in the Prometheus text format
        "prometheus_client>=0.20",
    ],
    entry_points={
        "console_scripts": [
            "loom-stream = loom.cli:stream_main",
            "loom-spy = loom.cli:spy_main",
            "loom-backup = loom.backup:main",
        ],
    },
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",  # the stateful model test of the store
            # a test that hangs fails with its traceback instead of stalling the whole run
            "pytest-timeout>=2.1",
            # a strict HTTP/1.1 parser: the hostile-input corpus's reference for what is valid
            "h11>=0.14",
            # the Python clients docs/http-api.md shows, tested as it says to use them
            "requests>=2.31",
            "httpx>=0.27",
            # builds the wheel in the non-editable install test, without network
            "wheel",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)

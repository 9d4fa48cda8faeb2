"""llama.cpp's corpus of real checkpoints' chat templates (its models/templates/*.jinja: Llama 3.x, Qwen 2.5 / 3,
DeepSeek R1 / V3.x, Mistral, Gemma, Granite, Command-R, Kimi, gpt-oss, ... about seventy), taken from the
llama-cpp-python source distribution that vendors llama.cpp, for test_template_corpus.

Where the templates come from, the first that has them wins:
  1. $SHOAL_TEMPLATE_CORPUS: a folder of .jinja files, or a llama-cpp-python sdist (.tar.gz) to extract them from;
  2. the cache folder (cache_dir()), filled by an earlier run;
  3. `pip download --no-deps --no-binary :all: llama-cpp-python==VERSION` (about 75 MB, from PyPI), of which only
     models/templates/*.jinja is extracted into the cache.
`python tests/server/template_corpus.py` fills the cache once (.ci/run does, so CI never skips the corpus).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python's release whose vendored llama.cpp the corpus is taken from
ENV = "SHOAL_TEMPLATE_CORPUS"
DOWNLOAD_TIMEOUT_S = 600


class CorpusUnavailable(Exception):
    """The corpus could not be found or fetched; the message says how to provide it."""


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "shoal-tests" / f"llama.cpp-templates-{VERSION}"


def extract_templates(sdist: Path, target: Path) -> None:
    """models/templates/*.jinja of the sdist into target (written whole or not at all: a half-done extraction
    that another run could read never appears under target's name)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar:  # streamed: the sdist is read once, only the templates are written
                folder, _, name = member.name.rpartition("/")
                if member.isfile() and folder.endswith("/models/templates") and name.endswith(".jinja"):
                    (partial / name).write_bytes(tar.extractfile(member).read())
        if not any(partial.glob("*.jinja")):
            raise CorpusUnavailable(f"{sdist} holds no models/templates/*.jinja; give {ENV} a llama-cpp-python "
                                    "source distribution (.tar.gz) or a folder of .jinja files")
        try:
            partial.rename(target)
        except OSError:  # another run got there first: its copy is as good as this one
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def download_sdist(folder: Path) -> Path:
    # Fail fast without a network (no retries, a short socket timeout): the test then skips, saying why.
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--retries", "0", "--timeout", "20",
               "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={VERSION}", "-d", str(folder)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusUnavailable(f"`{' '.join(command[2:])}` did not finish ({exc}); set {ENV} to a local "
                                "llama-cpp-python sdist or a folder of llama.cpp's models/templates") from None
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not found:
        said = " ".join(done.stderr.strip().splitlines()[-2:])[-300:]
        raise CorpusUnavailable(f"`{' '.join(command[2:])}` failed ({said}); set {ENV} to a local "
                                "llama-cpp-python sdist or a folder of llama.cpp's models/templates")
    return found[0]


def corpus_folder(download: bool = True) -> Path:
    """The folder of the corpus's .jinja files, extracted (and downloaded when download) if need be."""
    given = os.environ.get(ENV)
    if given:
        path = Path(given)
        if path.is_dir():
            if not any(path.glob("*.jinja")):
                raise CorpusUnavailable(f"{ENV}={given} is a folder without .jinja files; point it at llama.cpp's "
                                        "models/templates or at a llama-cpp-python sdist")
            return path
        if not path.is_file():
            raise CorpusUnavailable(f"{ENV}={given} does not exist; point it at llama.cpp's models/templates or at "
                                    "a llama-cpp-python sdist")
        target = cache_dir().with_name(cache_dir().name + "-from-" + path.name.removesuffix(".tar.gz"))
        if not target.is_dir():
            extract_templates(path, target)
        return target
    target = cache_dir()
    if target.is_dir():
        return target
    if not download:
        raise CorpusUnavailable(f"the corpus is not in {target}; run `python tests/server/template_corpus.py` "
                                f"(it downloads llama-cpp-python {VERSION}'s sdist) or set {ENV}")
    with tempfile.TemporaryDirectory(prefix="shoal-llama-cpp-sdist-") as folder:
        extract_templates(download_sdist(Path(folder)), target)
    return target


def load_corpus(download: bool = True) -> dict[str, str]:
    """Template name (the file's stem) -> its source."""
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(corpus_folder(download).glob("*.jinja"))}


if __name__ == "__main__":
    try:
        print(f"{len(load_corpus())} chat templates in {corpus_folder(download=False)}")
    except CorpusUnavailable as exc:
        sys.exit(f"template corpus: {exc}")

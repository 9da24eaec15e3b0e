"""
Reading the files a user hands us (checkpoints, tokenizers, data shards, JSONL, exports): regular files only,
sizes checked before anything is read, torch.load without code execution, and every failure one line naming the
file, what is wrong and what to do. A script opts in, at its entry point, to printing that line instead of a
traceback (install_error_handler). What a file must contain is checked by its reader (checkpoint_manager,
tokenizer, dataset...), not here.
"""

import os
import sys
import json
import stat
import pickle
import logging

import torch

logger = logging.getLogger("nanochat")

MAX_JSON_BYTES = 64 << 20  # a meta or config json is a few KB; a tokenizer.json a few MB


class InputFileError(ValueError):
    """A file that cannot be used (damaged, edited, the wrong kind): the message is one line naming the file, what
    is wrong and what to do, which a dying script prints without a traceback (see install_error_handler)."""


class MissingFileError(InputFileError, FileNotFoundError):
    """A file that is not there: one line, like InputFileError, and still a FileNotFoundError to callers."""


class CheckpointError(InputFileError):
    """A checkpoint, tokenizer or export file that cannot be used; one line, like InputFileError."""


def _print_file_errors(exc_type, exc, tb, _previous=sys.excepthook):
    # a broken or missing file is the user's to fix, not a bug in the code: a traceback would only hide the line
    if issubclass(exc_type, InputFileError):
        print(f"error: {exc}", file=sys.stderr)
    else:
        _previous(exc_type, exc, tb)


def install_error_handler():
    """Make an uncaught InputFileError print its one line (no traceback) before the script exits with status 1."""
    sys.excepthook = _print_file_errors


def _file_kind(mode):
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, fix, max_bytes=None, what="file"):
    """`path` opened for binary reading if it is a regular file (symlinks followed) of at most max_bytes, else
    InputFileError naming it. Opened non-blocking first, so a FIFO or device is refused at once instead of
    blocking or streaming forever (a symlink to /dev/zero); the size is checked before anything is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise MissingFileError(f"{path} does not exist; {fix}") from None
    except OSError as e:
        raise InputFileError(f"{path} cannot be opened ({e.strerror}); {fix}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"{path} is {_file_kind(st.st_mode)}, not a regular file; {fix}")
        if max_bytes is not None and st.st_size > max_bytes:
            raise InputFileError(f"{path} is {st.st_size:,} bytes, more than a {what} can be ({max_bytes:,}): "
                                 f"the wrong file or a damaged one; {fix}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_jsonl(path, parse=None, fix="fix or remove that line"):
    """Rows of a JSONL file (blank lines skipped), read as UTF-8 line by line (an editor's BOM on line 1 is fine).
    `parse(obj)` validates/transforms a row, raising ValueError/KeyError/TypeError if it is malformed. Every error
    is an InputFileError naming the file and line."""
    rows = []
    with open_regular(path, f"point to a JSONL file ({fix})") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputFileError(f"{where}: invalid UTF-8 at byte {e.start} of the line "
                                     f"({raw[e.start:e.start + 4]!r}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append(parse(obj) if parse else obj)
            except RecursionError:  # json.loads recurses once per level: a row nested thousands deep
                raise InputFileError(f"{where}: malformed row: nested too deeply to parse; {fix}") from None
            except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                reason = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                raise InputFileError(f"{where}: malformed row: {reason}; {fix}") from None
    if not rows:
        logger.warning(f"warning: {path} is empty (no rows): it adds nothing")
    return rows


def describe_error(e):
    """The first sentence of an exception from a reader (torch's zip reader writes a paragraph)."""
    lines = str(e).strip().splitlines()
    text = lines[0].split(". ")[0][:200] if lines else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_json_file(path, fix, max_bytes=MAX_JSON_BYTES):
    """A JSON object from the regular file `path`, or CheckpointError naming it (truncated, zeroed, edited...)."""
    with open_regular(path, fix, max_bytes, "JSON file") as f:
        data = f.read()
    try:
        obj = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path} nests too deeply to be a config: the file is corrupt; {fix}") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({describe_error(e)}): the file is truncated or corrupt; "
                              f"{fix}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, expected an object; {fix}")
    return obj


def load_tensor_file(path, device, fix, expect=dict, max_bytes=None):
    """torch.load(weights_only=True) of the regular file `path` (of at most max_bytes), every reader failure
    turned into one CheckpointError line."""
    with open_regular(path, fix, max_bytes, "checkpoint file") as f:
        try:
            obj = torch.load(f, map_location=device, weights_only=True)
        except pickle.UnpicklingError:
            # torch's own message would suggest weights_only=False, which would run the file's code
            raise CheckpointError(f"{path} holds objects other than tensors and plain containers, which are never "
                                  f"unpickled (loading must not run code); {fix}") from None
        except Exception as e:  # zip reader RuntimeError, EOFError...: all mean a truncated or damaged file
            raise CheckpointError(f"{path} cannot be read ({describe_error(e)}): the file is truncated or corrupt; "
                                  f"{fix}") from None
    if not isinstance(obj, expect):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a {expect.__name__}; {fix}")
    return obj

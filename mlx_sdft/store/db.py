"""The experience store: one SQLite file, HOME/store.db, with the exchanges `serve` answered and
the lessons taken from them.

- WAL mode and `synchronous=FULL`: a commit is on disk when it returns, a `kill -9` at any
  moment loses at most the transaction in flight, and readers never block the writer.
- Every write is one `BEGIN IMMEDIATE` transaction; the busy timeout makes a second process
  (the server and `teach` at once) wait for the lock instead of failing, so no row is lost.
- `PRAGMA user_version` is the schema version; `MIGRATIONS[i]` brings version i to i + 1.
- `secure_delete`, and VACUUM plus a WAL checkpoint after bulk deletes, so deleted text does
  not linger in free pages or the WAL file.
- `--redact` patterns (store/redact.py) are applied here, to every text before it is written.

Rows come back as dicts with JSON columns decoded. Times are Unix seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from mlx_sdft.errors import InputError
from mlx_sdft.store.redact import Redactor

FILENAME = "store.db"
BUSY_S = 30.0  # how long a writer waits for another process's lock before giving up
KINDS_1 = ("demonstration", "feedback", "hindsight", "import")
# rule: a standing instruction ("Always ..."), in serve's prompt at once and distilled by learn;
# fact: a statement the model should know, distilled the same way on questions about it.
STANDING = ("rule", "fact")
KINDS = (*KINDS_1, *STANDING)
STATES = ("new", "learned", "deleted")

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 0 -> 1
        """CREATE TABLE exchanges (
            id TEXT PRIMARY KEY,            -- the completion id the client got
            created REAL NOT NULL,
            model TEXT NOT NULL,            -- --model as given to serve
            version INTEGER NOT NULL,       -- the adapter version that answered (0: none)
            messages TEXT NOT NULL,         -- JSON: the request's messages
            tools TEXT,                     -- JSON or NULL
            sampling TEXT NOT NULL,         -- JSON: temperature, top_p, max_tokens, seed
            answer TEXT NOT NULL,
            finish_reason TEXT NOT NULL,    -- stop | length
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            thread TEXT NOT NULL            -- digest of messages + answer: finds the request that continues it
        )""",
        "CREATE INDEX exchanges_thread ON exchanges (thread)",
        "CREATE INDEX exchanges_created ON exchanges (created)",
        f"""CREATE TABLE lessons (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after a purge
            created REAL NOT NULL,
            updated REAL NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN {KINDS_1}),
            state TEXT NOT NULL DEFAULT 'new' CHECK (state IN {STATES}),
            exchange_id TEXT,               -- the source exchange (the id is kept if the exchange is forgotten)
            prompt TEXT NOT NULL,           -- JSON: messages up to the last user turn
            tools TEXT,
            answer TEXT,                    -- feedback, hindsight: the model's earlier answer
            text TEXT NOT NULL,             -- the demonstration, the feedback or the follow-up
            teacher_template TEXT           -- feedback, hindsight: their own; NULL: the run's --teacher-template
        )""",
        "CREATE INDEX lessons_state ON lessons (state)",
    ),
    (  # 1 -> 2: standing lessons (rules, facts) with their compliance check; SQLite cannot change a
        # CHECK constraint in place, so the table is rebuilt (its ids and id sequence kept)
        f"""CREATE TABLE lessons_2 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN {KINDS}),
            state TEXT NOT NULL DEFAULT 'new' CHECK (state IN {STATES}),
            exchange_id TEXT,
            prompt TEXT NOT NULL,           -- JSON; [] for a rule or fact
            tools TEXT,
            answer TEXT,
            text TEXT NOT NULL,             -- ... or the rule, or the fact
            teacher_template TEXT,
            check_regex TEXT,               -- rule: a regular expression an answer that follows it matches
            preflight TEXT                  -- rule, fact: JSON, how the model followed it in context when measured
        )""",
        "INSERT INTO lessons_2 (id, created, updated, kind, state, exchange_id, prompt, tools, answer, text, "
        "teacher_template) SELECT id, created, updated, kind, state, exchange_id, prompt, tools, answer, text, "
        "teacher_template FROM lessons",
        "DELETE FROM sqlite_sequence WHERE name = 'lessons_2'",
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'lessons_2', seq FROM sqlite_sequence WHERE name = 'lessons'",
        "DROP TABLE lessons",
        "ALTER TABLE lessons_2 RENAME TO lessons",
        "CREATE INDEX lessons_state ON lessons (state)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def new_exchange_id() -> str:
    """`ex-` + 10 random hex digits: short enough to type after `teach`."""
    return f"ex-{secrets.token_hex(5)}"


def thread_key(messages: list[dict]) -> str:
    """A digest of a conversation's roles and texts: an exchange's messages plus its answer has the
    same key as the first part of a later request that continues it."""
    turns = [[m.get("role"), m.get("content")] for m in messages]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode()).hexdigest()


def existing_home(home: str | Path) -> Path:
    """A --home to read from: it must exist (listing or measuring never creates one, a mistyped one
    included)."""
    path = Path(home).expanduser()
    if not path.exists():
        raise InputError(f"--home {home}: no such folder (serve, teach and rules add create it)")
    if not path.is_dir():
        raise InputError(f"--home {home}: {FILE_NOT_HOME}")
    return path


FILE_NOT_HOME = "a file, not a folder (--home names the folder that holds the store)"


class Store:
    """HOME/store.db, created (and migrated) on open, HOME too unless `create` is False (a command
    that only reads or removes). Safe to share between threads."""

    def __init__(self, home: str | Path, redact: list[str] | tuple = (), create: bool = True):
        self.home = Path(home).expanduser() if create else existing_home(home)
        self.path = self.home / FILENAME
        self._redactor = Redactor(redact)
        self._lock = threading.RLock()
        if self.home.exists() and not self.home.is_dir():
            raise InputError(f"{self.home}: {FILE_NOT_HOME}")
        if not create and not self.path.exists():  # a folder, but not a home: leave it as it is
            raise InputError(
                f"--home {home}: no {FILENAME} in it (serve, teach and rules add create it)"
            )
        try:
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            if (
                not self.path.exists()
            ):  # only you can read it (SQLite gives -wal and -shm the same mode)
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._con = sqlite3.connect(
                self.path, timeout=BUSY_S, isolation_level=None, check_same_thread=False
            )
            self._con.execute(f"PRAGMA busy_timeout = {int(BUSY_S * 1000)}")
            self._wal()
            for pragma in ("synchronous = FULL", "secure_delete = ON"):
                self._con.execute(f"PRAGMA {pragma}")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.path}: not a usable store ({e})") from None
        except OSError as e:
            raise InputError(f"{self.home}: cannot create the store ({e.strerror or e})") from None

    def _wal(self) -> None:
        """Switch to WAL. SQLite answers a journal-mode change with "database is locked" at once,
        without its busy handler, while another process is creating the same new store: retry."""
        deadline = time.monotonic() + BUSY_S
        while True:
            try:
                self._con.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def check(self) -> None:
        """`PRAGMA quick_check` (reads every page once): a damaged store is an InputError now,
        not on the first write (for `serve`, after a whole answer was generated)."""
        problems = [
            " ".join(row["quick_check"].split()) for row in self._query("PRAGMA quick_check(1)")
        ]
        if problems != ["ok"]:
            raise InputError(f"{self.path}: not a usable store ({problems[0]})")

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _tx(self):
        """One write transaction, holding the write lock from its start (no upgrade deadlocks)."""
        with self._lock, self._usable():
            self._con.execute("BEGIN IMMEDIATE")
            try:
                yield self._con
            except BaseException:
                if self._con.in_transaction:
                    self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")

    @contextmanager
    def _usable(self):
        """A damaged page or a lock held past BUSY_S shows up only when it is read or written:
        one line naming the file, as at open, not a traceback."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.path}: not a usable store ({e})") from None

    def _migrate(self) -> None:
        with (
            self._tx() as con
        ):  # inside the lock, so two processes opening a new store migrate once
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise InputError(
                    f"{self.path}: schema version {version} is newer than this mlx-sdft "
                    f"reads ({SCHEMA_VERSION}); upgrade mlx-sdft"
                )
            for steps in MIGRATIONS[version:]:
                for statement in steps:
                    con.execute(statement)
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock, self._usable():
            cursor = self._con.execute(sql, args)
            names = [d[0] for d in cursor.description]
            return [_decode(dict(zip(names, row))) for row in cursor.fetchall()]

    def redact(self, text: str | None) -> str | None:
        return self._redactor.text(text)

    def redact_messages(self, messages: list[dict]) -> list[dict]:
        return self._redactor.messages(messages)

    # ---- exchanges ----------------------------------------------------------------------

    def add_exchange(
        self,
        *,
        messages: list[dict],
        answer: str,
        model: str,
        version: int,
        sampling: dict,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        tools: list | None = None,
        id: str | None = None,
    ) -> str:
        """Commit one answered request (redacted); returns its id (`id`, else a new one)."""
        messages, answer = self.redact_messages(messages), self.redact(answer)
        thread = thread_key([*messages, {"role": "assistant", "content": answer}])
        row = (
            time.time(),
            model,
            version,
            json.dumps(messages, ensure_ascii=False),
            _json(tools),
            json.dumps(sampling),
            answer,
            finish_reason,
            prompt_tokens,
            completion_tokens,
            thread,
        )
        id = id or new_exchange_id()
        with self._tx() as con:
            con.execute(
                "INSERT INTO exchanges (created, model, version, messages, tools, sampling, answer, "
                "finish_reason, prompt_tokens, completion_tokens, thread, id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*row, id),
            )
        return id

    def exchange(self, id: str) -> dict | None:
        rows = self._query("SELECT * FROM exchanges WHERE id = ?", (id,))
        return rows[0] if rows else None

    def exchanges(self, limit: int | None = None) -> list[dict]:
        """Newest first."""
        return self._query(
            "SELECT * FROM exchanges ORDER BY created DESC, rowid DESC LIMIT ?", (limit or -1,)
        )

    def continued(self, messages: list[dict]) -> dict | None:
        """The newest exchange that `messages` continue: its messages, its answer, then one new user
        message. None when there is none (or the request does not end that way)."""
        if (
            len(messages) < 3
            or messages[-1].get("role") != "user"
            or messages[-2].get("role") != "assistant"
        ):
            return None
        rows = self._query(
            "SELECT * FROM exchanges WHERE thread = ? ORDER BY created DESC LIMIT 1",
            (thread_key(self.redact_messages(messages[:-1])),),
        )
        return rows[0] if rows else None

    def delete_exchanges(self, ids: list[str]) -> int:
        """Delete these exchanges in one transaction and compact the file (their text, and any
        other deleted text, leaves the disk); returns how many there were."""
        with self._tx() as con:
            count = sum(
                con.execute("DELETE FROM exchanges WHERE id = ?", (id,)).rowcount for id in ids
            )
        self._compact()
        return count

    def forget_exchanges(self) -> int:
        """Delete every exchange (lessons keep their own copy of the prompt) and compact the file."""
        with self._tx() as con:
            count = con.execute("DELETE FROM exchanges").rowcount
        self._compact()
        return count

    # ---- lessons ------------------------------------------------------------------------

    def add_lessons(self, lessons: list[dict]) -> list[int]:
        """Insert lessons in one transaction (all or none); each dict has kind, prompt, text and
        optionally tools, answer, exchange_id, teacher_template. Returns their ids."""
        now, ids = time.time(), []
        with self._tx() as con:
            for lesson in lessons:
                if lesson["kind"] not in KINDS:
                    raise ValueError(f"unknown lesson kind {lesson['kind']!r}")
                cursor = con.execute(
                    "INSERT INTO lessons (created, updated, kind, exchange_id, prompt, tools, answer, text, "
                    "teacher_template, check_regex) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        now,
                        now,
                        lesson["kind"],
                        lesson.get("exchange_id"),
                        json.dumps(
                            self.redact_messages(lesson.get("prompt", [])), ensure_ascii=False
                        ),
                        _json(lesson.get("tools")),
                        self.redact(lesson.get("answer")),
                        self.redact(lesson["text"]),
                        lesson.get("teacher_template"),
                        lesson.get("check_regex"),
                    ),
                )
                ids.append(cursor.lastrowid)
        return ids

    def add_lesson(self, **lesson) -> int:
        return self.add_lessons([lesson])[0]

    def lesson(self, id: int) -> dict | None:
        rows = self._query("SELECT * FROM lessons WHERE id = ?", (id,))
        return rows[0] if rows else None

    def lessons(self, state: str | None = None, standing: bool | None = None) -> list[dict]:
        """Oldest first; `state` None means every lesson that is not deleted; `standing` True only
        rules and facts, False only the others, None both."""
        where = ["state != 'deleted'" if state is None else "state = ?"]
        if standing is not None:
            where.append(f"kind {'IN' if standing else 'NOT IN'} {STANDING}")
        return self._query(
            f"SELECT * FROM lessons WHERE {' AND '.join(where)} ORDER BY id",
            () if state is None else (state,),
        )

    def set_state(self, ids: list[int], state: str) -> None:
        """Part 2's hook: mark lessons `learned` once a version that learned them is current (or
        back to `new` after a rollback). Deleting goes through `delete_lesson`."""
        if state not in ("new", "learned"):
            raise ValueError(f"set_state: {state!r} (use delete_lesson to delete)")
        with self._tx() as con:
            con.executemany(
                "UPDATE lessons SET state = ?, updated = ? WHERE id = ? AND state != 'deleted'",
                [(state, time.time(), i) for i in ids],
            )

    def set_preflight(self, id: int, preflight: dict) -> None:
        """Keep what a standing lesson's preflight measured (rules list shows it)."""
        with self._tx() as con:
            con.execute(
                "UPDATE lessons SET preflight = ?, updated = ? WHERE id = ? AND state != 'deleted'",
                (json.dumps(preflight), time.time(), id),
            )

    def delete_lesson(self, id: int) -> bool:
        """State `deleted`, and its texts blanked: the row stays only as a tombstone (id, kind,
        source exchange, times), so a version that learned it can be told apart."""
        with self._tx() as con:
            deleted = (
                con.execute(
                    "UPDATE lessons SET state = 'deleted', updated = ?, prompt = '[]', tools = NULL, "
                    "answer = NULL, text = '', teacher_template = NULL, check_regex = NULL, preflight = NULL WHERE id = ? AND state != 'deleted'",
                    (time.time(), id),
                ).rowcount
                == 1
            )
        self._checkpoint()  # the WAL still holds the page as it was before: copy back and empty it
        return deleted

    def purge_lessons(self) -> int:
        """Delete every lesson row, whatever its state, and compact the file."""
        with self._tx() as con:
            count = con.execute("DELETE FROM lessons").rowcount
        self._compact()
        return count

    def _compact(self) -> None:
        """VACUUM and truncate the WAL: deleted text leaves the disk now, not at the next checkpoint."""
        with self._lock, self._usable():
            self._con.execute("VACUUM")
        self._checkpoint()

    def _checkpoint(self) -> None:
        """Copy the WAL into store.db and truncate it to 0 bytes, so text deleted from the tables
        (zeroed in store.db by secure_delete) is not left in old WAL frames. Waits up to BUSY_S
        for another process's reader (the server between two reads)."""
        with self._lock, self._usable():
            busy = self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            raise InputError(
                f"{self.path}: another process kept the store busy for {BUSY_S:.0f} s; the deleted "
                f"text may remain in {FILENAME}-wal until it is run again"
            )


def _json(value) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _decode(row: dict) -> dict:
    for key in ("messages", "tools", "sampling", "prompt", "preflight"):
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    return row

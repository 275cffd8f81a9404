"""Many processes and threads charging one small wallet at once never overspend it.

4 processes (``spawn``), each with its own ledger on the same database, each with 8
threads using the blocking API (or 8 asyncio tasks), race to charge one wallet
(one-step charges, and holds that are then posted in part, in full, or voided). Most
requests are refused for lack of funds. Each worker reports the charges that
succeeded; the ledger must agree with them to the atomic unit.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import random
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Generator
from typing import Any

import pytest

from drip.errors import DripInsufficientCredits
from drip.ledger import TransferFlags, funding_account_id, open_ledger

PROCESSES = 4
THREADS = 8
OPS_PER_THREAD = 40
FUNDS = 400_000  # $0.40: a fraction of what the workers ask for
MAX_AMOUNT = 5_000
WALLET, REVENUE = "user:hot", "rev:hot"
FUND = funding_account_id("USDC")


#: What a step of a script is answered with when the ledger refuses it for lack of funds.
REFUSED = object()
Script = Generator[tuple[str, tuple[Any, ...], dict[str, Any]], Any, None]


def script(proc: int, unit: int, mine: list[tuple[str, int]], refused: list[int]) -> Script:
    """One worker's calls: yields (method, args, kwargs); is sent each call's result (or
    REFUSED). Records the charges that succeeded in ``mine``."""
    rng = random.Random(proc * 1000 + unit)
    for i in range(OPS_PER_THREAD):
        amount = rng.randint(1, MAX_AMOUNT)
        op_id = f"p{proc}-t{unit}-{i}"
        if rng.random() < 0.5:
            charge = yield "charge", (op_id, WALLET, REVENUE, amount), {"code": "search"}
            if charge is REFUSED:
                refused.append(1)
                continue
            assert charge.amount == amount
            mine.append((charge.id, charge.amount))
            continue
        hold = yield "hold", (op_id, WALLET, REVENUE, amount), {"code": "llm"}
        if hold is REFUSED:
            refused.append(1)
            continue
        roll = rng.random()
        if roll < 0.2:
            yield "void", (hold,), {}
        elif roll < 0.5:
            posted = yield "post", (hold,), {}
            assert posted.amount == amount
            mine.append((posted.id, posted.amount))
        else:
            posted = yield "post", (op_id, rng.randint(0, amount)), {}
            mine.append((posted.id, posted.amount))


def run_blocking(api: Any, steps: Script) -> None:
    answer: Any = None
    try:
        while True:
            name, args, kwargs = steps.send(answer)
            try:
                answer = getattr(api, name)(*args, **kwargs)
            except DripInsufficientCredits:
                answer = REFUSED
    except StopIteration:
        return


async def run_async(led: Any, steps: Script) -> None:
    answer: Any = None
    try:
        while True:
            name, args, kwargs = steps.send(answer)
            try:
                answer = await getattr(led, name)(*args, **kwargs)
            except DripInsufficientCredits:
                answer = REFUSED
    except StopIteration:
        return


def worker(url: str, proc: int, mode: str, start: Any, results: Any) -> None:
    """One process: open a ledger, wait for the others, then run its workers: THREADS
    threads on the blocking API, or as many asyncio tasks on one event loop."""
    try:
        led = open_ledger(url)
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((proc, [], 0, [traceback.format_exc()]))
        return
    succeeded: list[tuple[str, int]] = []
    refused: list[int] = []
    failures: list[str] = []

    def guarded(run: Callable[[], None]) -> None:
        try:
            run()
        except Exception:  # noqa: BLE001 - reported to the parent, which fails the test
            failures.append(traceback.format_exc())

    async def tasks() -> None:
        async def one(unit: int) -> None:
            try:
                await run_async(led, script(proc, unit, succeeded, refused))
            except Exception:  # noqa: BLE001 - reported to the parent
                failures.append(traceback.format_exc())

        await asyncio.gather(*(one(unit) for unit in range(THREADS)))

    try:
        start.wait(timeout=60)
        if mode == "tasks":
            guarded(lambda: asyncio.run(tasks()))
        else:
            threads = [
                threading.Thread(target=guarded, args=(
                    lambda unit=unit: run_blocking(led.sync, script(proc, unit, succeeded,
                                                                    refused)),))
                for unit in range(THREADS)
            ]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        led.close()
        results.put((proc, succeeded, len(refused), failures))


def _race(url: str, mode: str) -> None:
    led = open_ledger(url)
    try:
        led.sync.create_account(WALLET, "wallet")
        led.sync.create_account(REVENUE, "revenue")
        led.sync.transfer("funds", FUND, WALLET, FUNDS, code="topup")
    finally:
        led.close()

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(url, p, mode, start, results)) for p in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    reports = []
    try:
        for _ in procs:
            reports.append(results.get(timeout=120))
    except queue.Empty:
        raise AssertionError(f"workers did not report in time ({len(reports)} did)") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()

    failures = [f for _, _, _, fs in reports for f in fs]
    assert not failures, "\n".join(failures)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    succeeded = [s for _, ss, _, _ in reports for s in ss]
    refused = sum(r for _, _, r, _ in reports)
    total = sum(amount for _, amount in succeeded)
    ids = [i for i, _ in succeeded]
    assert len(ids) == len(set(ids))
    # the race was real: money ran out, and many requests were refused
    assert refused > 0
    assert succeeded
    assert total <= FUNDS

    # a fresh process's view of the ledger, as `drip doctor` would open it
    led = open_ledger(url)
    try:
        balance = led.balance(WALLET)
        assert balance.posted == FUNDS - total
        assert balance.pending == 0  # every hold was posted or voided
        assert balance.available == FUNDS - total >= 0
        assert led.balance(REVENUE).posted == total
        # every reported charge is in the journal with its amount, and nothing else is
        journal: dict[str, int] = {}
        cursor = None
        while True:
            page = led.history(WALLET, limit=1000, cursor=cursor)
            for t in page.items:
                if t.debit_account_id == WALLET and not t.flags & (
                    TransferFlags.PENDING | TransferFlags.VOID_PENDING
                ):
                    journal[t.id] = t.amount
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert journal == dict(succeeded)
        report = led.check_invariants()
        assert report.ok, report.checks
    finally:
        led.close()
    # and the operator's check, as a person would run it
    doctor = subprocess.run(
        [sys.executable, "-m", "drip.cli.main", "doctor", "--database-url", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert doctor.returncode == 0, doctor.stderr
    assert "FAILED" not in doctor.stdout and doctor.stdout.count("ok") >= 4


@pytest.mark.parametrize("mode", ["threads", "tasks"])
def test_many_processes_never_overspend_one_wallet(store_url: str, mode: str) -> None:
    """``threads``: the blocking API (the writer threads' batches); ``tasks``: asyncio
    callers (batches on each process's event loop, SQLite's open windows of holds)."""
    _race(store_url, mode)


def test_invariants_checked_while_money_moves_see_one_state(store_url: str) -> None:
    """``check_invariants`` (``drip doctor``) reads accounts and journal in one snapshot:
    a batch landing between two of its queries must not look like a broken ledger."""
    led = open_ledger(store_url)
    other = open_ledger(store_url)  # another process's connections, as a live server's
    try:
        led.sync.create_account("live-w", "wallet")
        led.sync.create_account("live-r", "revenue")
        led.sync.transfer("live-fund", FUND, "live-w", 10**12, code="topup")
        stop = threading.Event()
        moved = [0]

        def spend() -> None:
            while not stop.is_set():
                i = moved[0]
                hold = other.sync.hold(f"live-h{i}", "live-w", "live-r", 500, code="e")
                other.sync.post(hold, 300)
                other.sync.charge(f"live-c{i}", "live-w", "live-r", 200, code="e")
                moved[0] += 1

        worker = threading.Thread(target=spend)
        worker.start()
        try:
            reports = [led.check_invariants() for _ in range(15)]
        finally:
            stop.set()
            worker.join()
        assert moved[0] > 0
        failed = [r.checks for r in reports if not r.ok]
        assert not failed, failed[0]
    finally:
        other.close()
        led.close()

import threading

from chatchain import Usage, UsageLedger


def test_sum_adds_every_count_and_keeps_unknown_cost_unknown() -> None:
    a = Usage(
        prompt_tokens=10,
        completion_tokens=5,
        total_tokens=15,
        successful_requests=1,
        cost_usd=0.25,
        latency_s=1.0,
        model="m",
        turns=1,
    )
    b = Usage(
        prompt_tokens=1,
        completion_tokens=2,
        total_tokens=3,
        successful_requests=1,
        cost_usd=0.5,
        latency_s=0.5,
        model="m",
        turns=1,
    )
    total = a + b
    assert (total.prompt_tokens, total.completion_tokens, total.total_tokens) == (11, 7, 18)
    assert total.cost_usd == 0.75
    assert total.model == "m"
    assert total.turns == 2
    assert (a + Usage(cost_usd=None, turns=1, model="x")).cost_usd is None
    assert (a + Usage(cost_usd=None, turns=1, model="x")).model is None
    assert "cost unknown" in str(Usage(cost_usd=None))


def test_ledger_totals_are_exact_under_threads() -> None:
    ledger = UsageLedger()
    one = Usage(total_tokens=3, turns=1, cost_usd=0.5)

    def record() -> None:
        for _ in range(500):
            ledger.record("s", one)

    threads = [threading.Thread(target=record) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.total("s").total_tokens == 6000
    assert ledger.total("s").turns == 2000
    ledger.record("t", one)
    assert ledger.total().turns == 2001
    ledger.forget("s")
    assert ledger.total().turns == 1

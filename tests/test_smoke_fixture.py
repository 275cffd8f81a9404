from drip.ledger import Ledger


async def test_fixture_opens_each_store(ledger: Ledger) -> None:
    await ledger.create_account("user:a", "wallet")
    assert ledger.balance("user:a").available == 0

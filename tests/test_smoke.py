from tests import factories
from tests.conftest import deliver


async def test_processed_then_duplicate(client, db):
    payload = factories.mailbox_created()
    first = await deliver(client, payload)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "processed"
    again = await deliver(client, payload)
    assert again.json()["status"] == "duplicate"
    assert await db.fetchval("select deliveries from events") == 2

"""apps.py: the Dify apps served as models and their ids."""

from apps import assign_ids, key_id


def test_duplicate_names_get_distinct_stable_ids():
    apps = {"app-1": {"name": "Bot"}, "app-2": {"name": "Bot"}, "app-3": {"name": "Other"}}
    ids = assign_ids(apps, ["app-1", "app-2", "app-3"])
    assert ids == {"app-1": "Bot", "app-2": f"Bot#{key_id('app-2')}", "app-3": "Other"}
    assert assign_ids(dict(reversed(list(apps.items()))), ["app-1", "app-2", "app-3"]) == ids

"""The counted-noun wording of log lines ("1 shard", "3 shards")."""

from qmag_ray._text import counted


def test_one_is_singular_and_every_other_count_plural():
    assert counted(1, "shard") == "1 shard"
    assert counted(0, "shard") == "0 shards"
    assert counted(3, "kept failure") == "3 kept failures"
    assert counted(2, "non-backbone key") == "2 non-backbone keys"

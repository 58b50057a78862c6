"""Sign what a dead writer left unsigned: the tails of chains no checkpoint covers.

A writer signs its chain's head every ``checkpoint_every_s`` and when it closes; a process
killed (SIGKILL, power loss) leaves its last entries chained but unsigned, and since every
process writes a chain of its own, nobody would ever sign them. :func:`sign_unsigned_tails`
walks each chain from its last genuine checkpoint to its end, checking every link, and
signs the head it reached with a ``periodic`` checkpoint: the tail is then covered like any
other, and a later change to it breaks a signature. A chain whose links do not check is
not signed, and reported.

Signing a live writer's tail is harmless (its own next checkpoint signs a later head of the
same chain), so no liveness guess is needed: the gateway's retention job runs this once per
process, when it first holds its lease (gateway/retention_job.py), and before each run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Engine, insert

from compliance.audit_schema import checkpoints
from compliance.chain import PERIODIC, Checkpoint
from compliance.chain_walk import (
    Problem,
    chain_start,
    last_seq,
    load_checkpoints,
    snapshot,
    sort_checkpoints,
    walk_chain,
    writer_ids,
)
from compliance.records import now_us
from compliance.signing import CheckpointVerifier, sign_checkpoint


@dataclass(slots=True)
class TailsResult:
    signed: dict[str, int] = field(default_factory=dict)
    """Per chain, how many entries the new checkpoint covered."""
    refused: list[Problem] = field(default_factory=list)
    """Chains whose unsigned tail does not verify: left unsigned."""

    @property
    def entries(self) -> int:
        return sum(self.signed.values())


def sign_unsigned_tails(
    engine: Engine,
    signing_key: Ed25519PrivateKey,
    *,
    other_public_keys: Iterable[Ed25519PublicKey] = (),
) -> TailsResult:
    """Sign the head of every chain whose last entries no genuine checkpoint covers."""
    result = TailsResult()
    verifier = CheckpointVerifier([signing_key.public_key(), *other_public_keys])
    made: list[Checkpoint] = []
    with snapshot(engine) as connection:
        genuine, _ = sort_checkpoints(load_checkpoints(connection), verifier)
        for writer in writer_ids(connection):
            signed = genuine.get(writer, {})
            signed_seq = max(signed, default=0)
            last = last_seq(connection, writer)
            if last is None or last <= signed_seq:
                continue
            if signed:  # from the last signed head: what is before it is covered
                start: tuple[int, bytes] | Problem = (signed_seq, signed[signed_seq][0].head_hash)
            else:
                start = chain_start(connection, writer, signed)
            if isinstance(start, Problem):
                result.refused.append(start)
                continue
            walk = walk_chain(connection, writer, start[0], start[1], signed)
            if walk.problem is not None:
                result.refused.append(walk.problem)
                continue
            made.append(
                sign_checkpoint(signing_key, PERIODIC, writer, walk.seq, walk.head, now_us())
            )
            result.signed[writer] = walk.seq - signed_seq
    if made:
        with engine.begin() as connection:
            connection.execute(insert(checkpoints), [c.as_row() for c in made])
    return result

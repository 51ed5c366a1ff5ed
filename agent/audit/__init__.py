"""The tamper-evident audit trail: what the system showed, and when, as an append-only hash chain.

Three modules, because the agent, the verifier and the chain's rules change for different reasons
and a fix to one must not be able to slip into another:

- ``agent.audit.chain``   the record format, hashing and chaining that writer and verifier share
- ``agent.audit.writer``  ``AuditLog``: appending records, fsync, rotation, resuming after a crash,
                          and a new segment when the stretch it continues does not verify
- ``agent.audit.verify``  ``verify``: reading a trail back and reporting the first broken record (the
                          writer runs its ``verify_from`` as it opens; the verifier imports no writer)
- ``agent.audit.retention``  pruning whole old files by age and size, recorded in the trail first
                          (``pruned``) so that ``verify`` accepts the chain's new start

Callers import from those modules; this package re-exports nothing, so each import says which of
the three it depends on. ``or-agent audit verify`` (``agent.cli``) prints ``verify``'s result.
"""

"""One pydantic schema per params.yaml section: `stages/params/<section>.py`.

Each module holds its section's keys with their types, ranges and defaults, and is the one
place to add a key. Modules are imported one by one (this file imports none of them), so a
stage depends only on the schemas of the sections it reads.
"""

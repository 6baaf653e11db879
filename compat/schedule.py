"""The order the regression files run in: PostgreSQL 15's parallel_schedule.

Source: ``src/test/regress/parallel_schedule`` of PostgreSQL 15.3 (branch
REL_15_STABLE; read from a copy of the 15.3 source tree, Debian package
postgresql-15 15.3). Its groups are flattened in order: ``compat.run``
runs one file at a time, as ``pg_regress --schedule`` would with
``--max-connections=1``. ``ignore: random`` only marks random's failures as
ignorable there; it still runs (here it is just another file).

One change: ``create_schema`` (added to that group in 15.2) is left out,
because the files come from 15.1 (``compat.sources``), which has no
``create_schema.sql``. ``numeric_big`` and ``reindex_catalog`` exist in
15.1 but are in no parallel group (big-test and standalone-only files), so
they do not run either.
"""
from __future__ import annotations

SCHEDULE: tuple[str, ...] = tuple("""
test_setup
tablespace
boolean char name varchar text int2 int4 int8 oid float4 float8 bit numeric txid uuid enum
  money rangetypes pg_lsn regproc
strings numerology point lseg line box path polygon circle date time timetz timestamp
  timestamptz interval inet macaddr macaddr8 multirangetypes
geometry horology tstypes regex type_sanity opr_sanity misc_sanity comments expressions
  unicode xid mvcc
copy copyselect copydml insert insert_conflict
create_function_c create_misc create_operator create_procedure create_table create_type
create_index create_index_spgist create_view index_including index_including_gist
create_aggregate create_function_sql create_cast constraints triggers select inherit
  typed_table vacuum drop_if_exists updatable_views roleattributes create_am hash_func errors
  infinite_recurse
sanity_check
select_into select_distinct select_distinct_on select_implicit select_having subselect union
  case join aggregates transactions random portals arrays btree_index hash_index update delete
  namespace prepared_xacts
brin gin gist spgist privileges init_privs security_label collate matview lock
  replica_identity rowsecurity object_address tablesample groupingsets drop_operator password
  identity generated join_hash
brin_bloom brin_multi
create_table_like alter_generic alter_operator misc async dbsize merge misc_functions sysviews
  tsrf tid tidscan tidrangescan collate.icu.utf8 incremental_sort create_role
rules psql psql_crosstab amutils stats_ext collate.linux.utf8
select_parallel
write_parallel
vacuum_parallel
publication subscription
select_views portals_p2 foreign_key cluster dependency guc bitmapops combocid tsearch tsdicts
  foreign_data window xmlmap functional_deps advisory_lock indirect_toast equivclass
json jsonb json_encoding jsonpath jsonpath_encoding jsonb_jsonpath
plancache limit plpgsql copy2 temp domain rangefuncs prepare conversion truncate alter_table
  sequence polymorphism rowtypes returning largeobject with xml
partition_join partition_prune reloptions hash_part indexing partition_aggregate
  partition_info tuplesort explain compression memoize stats
event_trigger oidjoins
fast_default
""".split())

# In the 15.1 files but in no parallel group.
NOT_SCHEDULED = frozenset({"numeric_big", "reindex_catalog"})

assert len(SCHEDULE) == len(set(SCHEDULE)) == 211


def select(names: list[str] | None) -> list[str]:
    """The schedule, or the named files in schedule order (unknown names fail)."""
    if not names:
        return list(SCHEDULE)
    unknown = [n for n in names if n not in SCHEDULE]
    if unknown:
        raise ValueError(f"not in PostgreSQL 15's parallel_schedule: {', '.join(unknown)}")
    wanted = set(names)
    return [n for n in SCHEDULE if n in wanted]

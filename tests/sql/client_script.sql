-- Run by psql both directly and through mmproxy; the outputs must match.
\set ON_ERROR_STOP 0
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), tags text[], doc jsonb);
INSERT INTO items VALUES (1, 'apple', 1.50, '{red,fruit}', '{"k": 1}'),
                         (2, 'bread', 2.25, '{}', null), (3, 'café', 3.00, null, '[1,2]');
-- multi-statement strings in one Query message
SELECT count(*) AS n FROM items \; SELECT max(price) AS top FROM items \; SELECT 'multi' AS tag;
-- \gset
SELECT id AS first_id, name AS first_name FROM items ORDER BY id LIMIT 1 \gset
\echo first is :first_id :first_name
-- \copy to and from files, and COPY inline
\copy items TO 'copy.tsv'
CREATE TABLE items2 (LIKE items);
\copy items2 FROM 'copy.tsv'
COPY items2 (id, name) FROM STDIN;
10	ten
11	eleven
\.
SELECT * FROM items2 ORDER BY id;
COPY (SELECT id, name FROM items2 ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER);
-- cursors
BEGIN;
DECLARE c CURSOR FOR SELECT g, g * g AS sq FROM generate_series(1, 10) g;
FETCH 3 FROM c;
MOVE 2 IN c;
FETCH NEXT FROM c;
CLOSE c;
COMMIT;
-- errors inside transactions, savepoints
BEGIN;
INSERT INTO items VALUES (4, 'dup');
INSERT INTO items VALUES (4, 'dup again');
SELECT 1;
ROLLBACK;
BEGIN;
SAVEPOINT s1;
SELECT 1 / 0;
ROLLBACK TO SAVEPOINT s1;
INSERT INTO items VALUES (5, 'kept');
COMMIT;
SELECT id, name FROM items ORDER BY id;
-- notices and a function
CREATE FUNCTION twice(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2';
DO $$ BEGIN RAISE NOTICE 'hello from %', 'plpgsql'; END $$;
SELECT twice(21);
-- prepared statements at SQL level
PREPARE q(int) AS SELECT name FROM items WHERE id = $1;
EXECUTE q(2);
DEALLOCATE q;
-- an empty query and a syntax error
;
SELEC 1;
-- large objects go through the FunctionCall protocol message
\lo_import 'copy.tsv'
SELECT count(*) AS lo_count FROM pg_largeobject_metadata;
SET application_name = 'psql-script';
SHOW application_name;
\x on
SELECT * FROM items WHERE id = 1;

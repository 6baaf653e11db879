"""SQLAlchemy 2 scenarios (over psycopg 3) of tests/test_drivers.py (see
scenario_kit.py for the command line and the transcript). Tables:
sqlalchemy_*."""
from __future__ import annotations

from sqlalchemy import (Column, ForeignKey, Integer, MetaData, String, Table, create_engine,
                        delete, func, insert, select, text, update)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from scenario_kit import TARGET, out, run, step

engine = create_engine(TARGET.url("postgresql+psycopg"), pool_size=2)
other = create_engine(TARGET.url("postgresql+psycopg", other=True))


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "sqlalchemy_author"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    books: Mapped[list["Book"]] = relationship(back_populates="author",
                                               order_by="Book.id", cascade="all, delete-orphan")


class Book(Base):
    __tablename__ = "sqlalchemy_book"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey("sqlalchemy_author.id"))
    author: Mapped[Author] = relationship(back_populates="books")


core_meta = MetaData()
kv = Table("sqlalchemy_kv", core_meta,
           Column("k", Integer, primary_key=True, autoincrement=False),
           Column("v", String(20)))


def seen_elsewhere(sql: str) -> None:
    def read():
        with other.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    step("seen by another session", read)


def create_orm_tables() -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)


def orm_add_commit_rollback():
    step("drop_all, create_all", create_orm_tables)
    with Session(engine) as s:
        def add(*objs):
            s.add_all(objs)
        step("add author 1 with two books", lambda: add(Author(id=1, name="Ann", books=[
            Book(id=1, title="First"), Book(id=2, title="Second")])))
        step("commit", s.commit)
        step("add author 2", lambda: add(Author(id=2, name="Bob")))
        step("flush", s.flush)
        step("query in the transaction", lambda: [
            (a.id, a.name) for a in s.scalars(select(Author).order_by(Author.id))])
        step("rollback", s.rollback)
        step("query after rollback", lambda: [
            (a.id, a.name, [b.title for b in a.books])
            for a in s.scalars(select(Author).order_by(Author.id))])

        def rename():
            s.get(Author, 1).name = "Anna"
            s.get(Book, 2).title = "Second, revised"
        step("change author 1 and book 2", rename)
        step("commit", s.commit)
    seen_elsewhere("SELECT a.id, a.name, b.id, b.title FROM sqlalchemy_author a "
                   "JOIN sqlalchemy_book b ON b.author_id = a.id ORDER BY b.id")


def failed_flush_then_rollback():
    with Session(engine) as s:
        step("add author 1 again", lambda: s.add(Author(id=1, name="dup")))
        step("flush", s.flush)
        step("query after the failed flush", lambda: s.scalar(select(func.count(Author.id))))
        step("rollback", s.rollback)
        step("add author 3 and a book of author 99", lambda: s.add_all([
            Author(id=3, name="Cy"), Book(id=3, title="orphan", author_id=99)]))
        step("commit", s.commit)
        step("rollback", s.rollback)
        step("add author 3", lambda: s.add(Author(id=3, name="Cy")))
        step("commit", s.commit)
        step("delete author 3", lambda: s.delete(s.get(Author, 3)))
        step("rollback", s.rollback)
    seen_elsewhere("SELECT id, name FROM sqlalchemy_author ORDER BY id")


def nested_savepoints():
    with Session(engine) as s:
        def run_it():
            with s.begin():
                s.add(Author(id=10, name="outer"))
                nested = s.begin_nested()
                s.add(Author(id=11, name="rolled back savepoint"))
                s.flush()
                nested.rollback()
                try:
                    with s.begin_nested():
                        s.add(Author(id=1, name="dup"))      # fails at the savepoint's flush
                except IntegrityError as e:
                    out(f"begin_nested raised: {type(e).__name__} {e.orig.sqlstate}")
                with s.begin_nested():
                    s.add(Author(id=12, name="released savepoint"))
                ids = s.scalars(select(Author.id).where(Author.id >= 10).order_by(Author.id))
                out(f"in the transaction: {list(ids)}")
            return "committed"
        step("begin, nested savepoints, commit", run_it)
    seen_elsewhere("SELECT id, name FROM sqlalchemy_author WHERE id >= 10 ORDER BY id")


def core_insert_select():
    def create():
        core_meta.drop_all(engine)
        core_meta.create_all(engine)
    step("drop_all, create_all", create)
    with engine.begin() as conn:
        step("insert many", lambda: conn.execute(
            insert(kv), [{"k": i, "v": f"v{i}"} for i in range(1, 21)]).rowcount)
        step("insert returning", lambda: [tuple(r) for r in conn.execute(
            insert(kv).returning(kv.c.k, kv.c.v), [{"k": 21, "v": "r"}, {"k": 22, "v": "s"}])])
        step("update", lambda: conn.execute(
            update(kv).where(kv.c.k <= 5).values(v="small")).rowcount)
        step("delete", lambda: conn.execute(delete(kv).where(kv.c.k > 20)).rowcount)
    with engine.connect() as conn:
        step("select where order by", lambda: [tuple(r) for r in conn.execute(
            select(kv.c.k, kv.c.v).where(kv.c.k.in_([1, 5, 6, 20])).order_by(kv.c.k.desc()))])
        step("aggregate", lambda: tuple(conn.execute(
            select(func.count(), func.sum(kv.c.k))).one()))
        step("insert duplicate", lambda: conn.execute(insert(kv).values(k=1, v="dup")))
        step("rollback", conn.rollback)
        step("insert 30", lambda: conn.execute(insert(kv).values(k=30, v="thirty")).rowcount)
        step("commit", conn.commit)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        step("autocommit insert 31", lambda: conn.execute(
            insert(kv).values(k=31, v="auto")).rowcount)
    seen_elsewhere("SELECT count(*), sum(k), count(*) FILTER (WHERE v = 'small') "
                   "FROM sqlalchemy_kv")


if __name__ == "__main__":
    run([("orm_add_commit_rollback", orm_add_commit_rollback),
         ("failed_flush_then_rollback", failed_flush_then_rollback),
         ("nested_savepoints", nested_savepoints),
         ("core_insert_select", core_insert_select)])

// pgjdbc scenarios of tests/test_drivers.py: one JVM runs them all and
// prints a transcript that must be the same against a plain PostgreSQL 15
// and through a cluster node.
//
//   java -cp <dir with JdbcScenarios.class>:/usr/share/java/postgresql.jar \
//        JdbcScenarios <host> <port> [<host2> <port2>]
//
// <host2>:<port2> is where a second session reads back what was committed
// (another cluster node; the same server when run against a plain one).
// Each scenario drops and creates its own jdbc_* tables, and leaves them
// behind so that the test can compare them across the cluster's nodes.
// Printed: row counts, rows read back in order, SQLSTATEs and primary error
// messages; never sequence values, OIDs, pids or times. Every socket read
// gives up after socketTimeout seconds, so a hang shows as 08006 instead of
// blocking the other scenarios.

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Properties;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;
import org.postgresql.util.PSQLException;

public class JdbcScenarios {
    static String host, host2;
    static int port, port2;
    static final int SOCKET_TIMEOUT_S = 15;
    static final int NOTIFY_WAIT_MS = 5000;

    interface Call {
        Object run() throws Exception;
    }

    interface Scenario {
        void run() throws Exception;
    }

    public static void main(String[] args) throws Exception {
        host = args[0];
        port = Integer.parseInt(args[1]);
        host2 = args.length > 2 ? args[2] : host;
        port2 = args.length > 3 ? Integer.parseInt(args[3]) : port;
        String only = System.getenv("JDBC_SCENARIO");   // run one scenario by hand
        Object[][] scenarios = {
            {"rollback_then_commit", (Scenario) JdbcScenarios::rollbackThenCommit},
            {"savepoints", (Scenario) JdbcScenarios::savepoints},
            {"aborted_transaction", (Scenario) JdbcScenarios::abortedTransaction},
            {"autosave_always", (Scenario) () -> autosave("always")},
            {"autosave_conservative", (Scenario) () -> autosave("conservative")},
            {"prepare_threshold_1", (Scenario) () -> prepareThreshold(1)},
            {"prepare_threshold_0", (Scenario) () -> prepareThreshold(0)},
            {"batch_rewrite", (Scenario) JdbcScenarios::batchRewrite},
            {"copy_in_out", (Scenario) JdbcScenarios::copyInOut},
            {"generated_keys", (Scenario) JdbcScenarios::generatedKeys},
            {"listen_notify", (Scenario) JdbcScenarios::listenNotify},
            {"fetch_size", (Scenario) JdbcScenarios::fetchSize},
        };
        for (Object[] s : scenarios) {
            if (only != null && !only.equals(s[0])) {
                continue;
            }
            System.out.println("== " + s[0]);
            try {
                ((Scenario) s[1]).run();
            } catch (Exception e) {
                System.out.println("scenario aborted: " + describe(e));
            }
        }
        System.out.println("== done");
    }

    // -- helpers ----------------------------------------------------------------

    static Connection connect(String h, int p, String... props) throws SQLException {
        Properties info = new Properties();
        info.setProperty("user", "postgres");
        info.setProperty("socketTimeout", String.valueOf(SOCKET_TIMEOUT_S));
        info.setProperty("connectTimeout", "10");
        for (String kv : props) {
            String[] parts = kv.split("=", 2);
            info.setProperty(parts[0], parts[1]);
        }
        return DriverManager.getConnection("jdbc:postgresql://" + h + ":" + p + "/postgres", info);
    }

    static Connection connect(String... props) throws SQLException {
        return connect(host, port, props);
    }

    static String describe(Throwable e) {
        if (e instanceof BatchUpdateException && ((SQLException) e).getNextException() != null) {
            e = ((SQLException) e).getNextException();
        }
        if (e instanceof SQLException) {
            SQLException se = (SQLException) e;
            String msg = se.getMessage();
            if (e instanceof PSQLException && ((PSQLException) e).getServerErrorMessage() != null) {
                msg = ((PSQLException) e).getServerErrorMessage().getMessage();
            }
            return "ERROR " + se.getSQLState() + " " + firstLine(msg);
        }
        return e.getClass().getSimpleName() + " " + firstLine(String.valueOf(e.getMessage()));
    }

    static String firstLine(String s) {
        int nl = s.indexOf('\n');
        return nl < 0 ? s : s.substring(0, nl);
    }

    /** One step of a scenario: its result or its error, on one line. */
    static Object step(String what, Call call) {
        try {
            Object r = call.run();
            System.out.println(what + ": " + (r == null ? "ok" : show(r)));
            return r;
        } catch (Exception e) {
            System.out.println(what + ": " + describe(e));
            return null;
        }
    }

    static String show(Object r) {
        if (r instanceof int[]) {
            return Arrays.toString((int[]) r);
        }
        return String.valueOf(r);
    }

    static String rows(Connection c, String sql) throws SQLException {
        List<String> out = new ArrayList<>();
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            int n = rs.getMetaData().getColumnCount();
            while (rs.next()) {
                List<String> row = new ArrayList<>();
                for (int i = 1; i <= n; i++) {
                    row.add(rs.getString(i));
                }
                out.add(n == 1 ? row.get(0) : "(" + String.join(", ", row) + ")");
            }
        }
        return "[" + String.join(", ", out) + "]";
    }

    /** Rows as a new session on the second target sees them. */
    static void seenElsewhere(String sql) {
        step("seen by another session", () -> {
            try (Connection c = connect(host2, port2)) {
                return rows(c, sql);
            }
        });
    }

    static void ddl(Connection c, String... statements) throws SQLException {
        // One statement per execute: DDL travels as the statement's text.
        try (Statement st = c.createStatement()) {
            for (String s : statements) {
                st.execute(s);
            }
        }
    }

    static void table(Connection c, String name, String columns) throws SQLException {
        ddl(c, "DROP TABLE IF EXISTS " + name, "CREATE TABLE " + name + " (" + columns + ")");
    }

    // -- scenarios ---------------------------------------------------------------

    static void rollbackThenCommit() throws Exception {
        try (Connection c = connect(); Statement st = c.createStatement()) {
            table(c, "jdbc_rb", "id int PRIMARY KEY, v text");
            c.setAutoCommit(false);
            step("insert 1", () -> st.executeUpdate("INSERT INTO jdbc_rb VALUES (1, 'rolled back')"));
            step("rollback", () -> { c.rollback(); return null; });
            step("rows after rollback", () -> rows(c, "SELECT id FROM jdbc_rb ORDER BY id"));
            step("insert 2", () -> st.executeUpdate("INSERT INTO jdbc_rb VALUES (2, 'committed')"));
            step("commit", () -> { c.commit(); return null; });
            seenElsewhere("SELECT id, v FROM jdbc_rb ORDER BY id");
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO jdbc_rb VALUES (?, ?)")) {
                for (int id = 3; id <= 4; id++) {
                    int i = id;
                    step("prepared insert " + i, () -> {
                        ps.setInt(1, i);
                        ps.setString(2, "rolled back too");
                        return ps.executeUpdate();
                    });
                }
            }
            step("rollback", () -> { c.rollback(); return null; });
            c.setAutoCommit(true);
            step("autocommit insert 5", () -> st.executeUpdate("INSERT INTO jdbc_rb VALUES (5, 'auto')"));
            seenElsewhere("SELECT id, v FROM jdbc_rb ORDER BY id");
        }
    }

    static void savepoints() throws Exception {
        try (Connection c = connect(); Statement st = c.createStatement()) {
            table(c, "jdbc_sp", "id int PRIMARY KEY");
            c.setAutoCommit(false);
            step("insert 1", () -> st.executeUpdate("INSERT INTO jdbc_sp VALUES (1)"));
            Savepoint[] sp = new Savepoint[3];
            step("savepoint a", () -> { sp[0] = c.setSavepoint("a"); return null; });
            step("insert 2", () -> st.executeUpdate("INSERT INTO jdbc_sp VALUES (2)"));
            step("rollback to a", () -> { c.rollback(sp[0]); return null; });
            step("unnamed savepoint", () -> { sp[1] = c.setSavepoint(); return null; });
            step("insert 3", () -> st.executeUpdate("INSERT INTO jdbc_sp VALUES (3)"));
            step("insert 3 again", () -> st.executeUpdate("INSERT INTO jdbc_sp VALUES (3)"));
            step("rollback to unnamed", () -> { c.rollback(sp[1]); return null; });
            step("savepoint d", () -> { sp[2] = c.setSavepoint("d"); return null; });
            step("insert 4", () -> st.executeUpdate("INSERT INTO jdbc_sp VALUES (4)"));
            step("release d", () -> { c.releaseSavepoint(sp[2]); return null; });
            step("rows before commit", () -> rows(c, "SELECT id FROM jdbc_sp ORDER BY id"));
            step("commit", () -> { c.commit(); return null; });
            seenElsewhere("SELECT id FROM jdbc_sp ORDER BY id");
        }
    }

    static void abortedTransaction() throws Exception {
        try (Connection c = connect(); Statement st = c.createStatement()) {
            table(c, "jdbc_abort", "id int PRIMARY KEY");
            c.setAutoCommit(false);
            step("insert 1", () -> st.executeUpdate("INSERT INTO jdbc_abort VALUES (1)"));
            step("divide by zero", () -> rows(c, "SELECT 1/0"));
            step("next statement", () -> rows(c, "SELECT 1"));
            step("prepared next statement", () -> {
                try (PreparedStatement ps = c.prepareStatement("INSERT INTO jdbc_abort VALUES (?)")) {
                    ps.setInt(1, 2);
                    return ps.executeUpdate();
                }
            });
            step("rollback", () -> { c.rollback(); return null; });
            step("insert 3", () -> st.executeUpdate("INSERT INTO jdbc_abort VALUES (3)"));
            step("commit", () -> { c.commit(); return null; });
            seenElsewhere("SELECT id FROM jdbc_abort ORDER BY id");
            step("divide by zero", () -> rows(c, "SELECT 1/0"));
            step("commit of the failed transaction", () -> { c.commit(); return null; });
            seenElsewhere("SELECT id FROM jdbc_abort ORDER BY id");
        }
    }

    static void autosave(String mode) throws Exception {
        String t = "jdbc_autosave_" + mode;
        try (Connection c = connect("autosave=" + mode, "prepareThreshold=1"); Statement st = c.createStatement()) {
            table(c, t, "id int PRIMARY KEY, v text");
            c.setAutoCommit(false);
            step("insert 1", () -> st.executeUpdate("INSERT INTO " + t + " VALUES (1, 'a')"));
            step("insert 1 again", () -> st.executeUpdate("INSERT INTO " + t + " VALUES (1, 'b')"));
            step("insert 2", () -> st.executeUpdate("INSERT INTO " + t + " VALUES (2, 'c')"));
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + t + " VALUES (?, ?)")) {
                for (int id : new int[] {3, 2, 4}) {
                    step("prepared insert " + id, () -> {
                        ps.setInt(1, id);
                        ps.setString(2, "p");
                        return ps.executeUpdate();
                    });
                }
            }
            step("rows before commit", () -> rows(c, "SELECT id, v FROM " + t + " ORDER BY id"));
            step("commit", () -> { c.commit(); return null; });
            seenElsewhere("SELECT id, v FROM " + t + " ORDER BY id");
            // What autosave=conservative is for: a server-prepared SELECT *
            // (prepareThreshold=1) whose result type changed under it (0A000
            // "cached plan must not change result type") is rolled back to the
            // savepoint and run again.
            try (PreparedStatement sel = c.prepareStatement(
                    "SELECT * FROM " + t + " WHERE id >= ?")) {
                for (int round = 1; round <= 6; round++) {
                    int r = round;
                    if (round == 4) {
                        // the open transaction's lock would block the ALTER
                        step("commit", () -> { c.commit(); return null; });
                        step("add a column (other session)", () -> {
                            try (Connection o = connect()) {
                                ddl(o, "ALTER TABLE " + t + " ADD COLUMN w int DEFAULT 7");
                            }
                            return null;
                        });
                    }
                    step("prepared select round " + r, () -> {
                        sel.setInt(1, 1);
                        try (ResultSet rs = sel.executeQuery()) {
                            ResultSetMetaData md = rs.getMetaData();
                            int n = 0;
                            while (rs.next()) {
                                n++;
                            }
                            return md.getColumnCount() + " columns, " + n + " rows";
                        }
                    });
                }
            }
            step("insert 5", () -> st.executeUpdate("INSERT INTO " + t + " (id, v) VALUES (5, 'd')"));
            step("commit", () -> { c.commit(); return null; });
            seenElsewhere("SELECT id, v, w FROM " + t + " ORDER BY id");
        }
    }

    static void prepareThreshold(int threshold) throws Exception {
        String t = "jdbc_prep" + threshold;
        try (Connection c = connect("prepareThreshold=" + threshold)) {
            table(c, t, "id int PRIMARY KEY, v text");
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + t + " VALUES (?, ?)");
                 PreparedStatement sel = c.prepareStatement("SELECT v FROM " + t + " WHERE id = ?")) {
                for (int id = 1; id <= 5; id++) {
                    int i = id;
                    step("autocommit insert " + i, () -> {
                        ins.setInt(1, i);
                        ins.setString(2, "v" + i);
                        return ins.executeUpdate();
                    });
                }
                for (int id = 1; id <= 6; id += 5) {
                    int i = id;
                    step("select " + i, () -> {
                        sel.setInt(1, i);
                        try (ResultSet rs = sel.executeQuery()) {
                            return rs.next() ? rs.getString(1) : "no row";
                        }
                    });
                }
                c.setAutoCommit(false);
                for (int id = 6; id <= 8; id++) {
                    int i = id;
                    step("insert " + i, () -> {
                        ins.setInt(1, i);
                        ins.setString(2, "rolled back");
                        return ins.executeUpdate();
                    });
                }
                step("rollback", () -> { c.rollback(); return null; });
                for (int id = 9; id <= 11; id++) {
                    int i = id;
                    step("insert " + i, () -> {
                        ins.setInt(1, i);
                        ins.setString(2, "v" + i);
                        return ins.executeUpdate();
                    });
                }
                step("select 10 in the transaction", () -> {
                    sel.setInt(1, 10);
                    try (ResultSet rs = sel.executeQuery()) {
                        return rs.next() ? rs.getString(1) : "no row";
                    }
                });
                step("commit", () -> { c.commit(); return null; });
            }
            seenElsewhere("SELECT id, v FROM " + t + " ORDER BY id");
        }
    }

    static void batchRewrite() throws Exception {
        try (Connection c = connect("reWriteBatchedInserts=true")) {
            table(c, "jdbc_batch", "id int PRIMARY KEY, v text");
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO jdbc_batch VALUES (?, ?)")) {
                for (int i = 1; i <= 100; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "b" + i);
                    ps.addBatch();
                }
                step("executeBatch 100", () -> ps.executeBatch().length + " results");
                step("commit", () -> { c.commit(); return null; });
                for (int i = 101; i <= 110; i++) {
                    ps.setInt(1, i == 105 ? 50 : i);      // 50 exists: the batch fails
                    ps.setString(2, "b" + i);
                    ps.addBatch();
                }
                step("executeBatch with a duplicate", () -> ps.executeBatch().length + " results");
                step("rollback", () -> { c.rollback(); return null; });
            }
            c.setAutoCommit(true);
            try (Statement st = c.createStatement()) {
                st.addBatch("INSERT INTO jdbc_batch VALUES (201, 's')");
                st.addBatch("UPDATE jdbc_batch SET v = 'u' WHERE id <= 10");
                st.addBatch("DELETE FROM jdbc_batch WHERE id > 95 AND id <= 100");
                step("autocommit statement batch", () -> st.executeBatch());
            }
            seenElsewhere("SELECT count(*), sum(id), count(*) FILTER (WHERE v = 'u') FROM jdbc_batch");
        }
    }

    static void copyInOut() throws Exception {
        try (Connection c = connect()) {
            table(c, "jdbc_copy", "id int PRIMARY KEY, v text");
            CopyManager cm = ((PGConnection) c).getCopyAPI();
            StringBuilder data = new StringBuilder();
            for (int i = 1; i <= 500; i++) {
                data.append(i).append(",line ").append(i).append('\n');
            }
            step("copyIn 500 (autocommit)", () -> cm.copyIn(
                    "COPY jdbc_copy FROM STDIN (FORMAT csv)", new StringReader(data.toString())));
            c.setAutoCommit(false);
            step("copyIn 2 in a transaction", () -> cm.copyIn(
                    "COPY jdbc_copy FROM STDIN (FORMAT csv)", new StringReader("501,x\n502,y\n")));
            step("rollback", () -> { c.rollback(); return null; });
            step("copyIn with a duplicate", () -> cm.copyIn(
                    "COPY jdbc_copy FROM STDIN (FORMAT csv)", new StringReader("503,x\n1,y\n")));
            step("rollback", () -> { c.rollback(); return null; });
            step("copyIn 1 in a transaction", () -> cm.copyIn(
                    "COPY jdbc_copy FROM STDIN (FORMAT csv)", new StringReader("600,z\n")));
            step("commit", () -> { c.commit(); return null; });
            c.setAutoCommit(true);
            StringWriter out = new StringWriter();
            step("copyOut", () -> cm.copyOut(
                    "COPY (SELECT * FROM jdbc_copy ORDER BY id) TO STDOUT (FORMAT csv)", out));
            String[] lines = out.toString().split("\n");
            System.out.println("copied out: " + lines.length + " lines, first " + lines[0]
                    + ", last " + lines[lines.length - 1]
                    + ", same as copied in: " + out.toString().equals(data + "600,z\n"));
            seenElsewhere("SELECT count(*), sum(id) FROM jdbc_copy");
        }
    }

    static void generatedKeys() throws Exception {
        try (Connection c = connect(); Statement st = c.createStatement()) {
            table(c, "jdbc_keys", "id serial PRIMARY KEY, v text");
            step("insert returning generated keys", () -> {
                int n = st.executeUpdate("INSERT INTO jdbc_keys (v) VALUES ('a')",
                        Statement.RETURN_GENERATED_KEYS);
                return n + " row, " + keys(st.getGeneratedKeys());
            });
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement(
                    "INSERT INTO jdbc_keys (v) VALUES (?)", new String[] {"id"})) {
                for (String v : new String[] {"b", "c"}) {
                    step("prepared insert " + v, () -> {
                        ps.setString(1, v);
                        int n = ps.executeUpdate();
                        return n + " row, " + keys(ps.getGeneratedKeys());
                    });
                }
                step("batch of 3", () -> {
                    for (String v : new String[] {"d", "e", "f"}) {
                        ps.setString(1, v);
                        ps.addBatch();
                    }
                    int[] n = ps.executeBatch();
                    return n.length + " results, " + keys(ps.getGeneratedKeys());
                });
            }
            step("commit", () -> { c.commit(); return null; });
            seenElsewhere("SELECT v FROM jdbc_keys ORDER BY id");
            seenElsewhere("SELECT count(DISTINCT id) = count(*) FROM jdbc_keys");
        }
    }

    /** Whether keys came back (not their values: each node has its own residue). */
    static String keys(ResultSet rs) throws SQLException {
        List<String> cols = new ArrayList<>();
        for (int i = 1; i <= rs.getMetaData().getColumnCount(); i++) {
            cols.add(rs.getMetaData().getColumnName(i));
        }
        List<Long> ids = new ArrayList<>();
        while (rs.next()) {
            ids.add(rs.getLong(1));
        }
        rs.close();
        boolean ascending = true;
        for (int i = 1; i < ids.size(); i++) {
            ascending &= ids.get(i) > ids.get(i - 1);
        }
        return ids.size() + " keys " + cols + (ids.isEmpty() ? "" : ", positive " + (ids.get(0) > 0)
                + ", ascending " + ascending);
    }

    static void listenNotify() throws Exception {
        try (Connection listener = connect(); Connection w = connect();
             Statement lst = listener.createStatement(); Statement st = w.createStatement()) {
            table(w, "jdbc_notify", "id int PRIMARY KEY");
            step("listen", () -> { lst.execute("LISTEN jdbc_chan"); return null; });
            w.setAutoCommit(false);
            step("insert 1", () -> st.executeUpdate("INSERT INTO jdbc_notify VALUES (1)"));
            step("notify in the transaction", () -> { st.execute("NOTIFY jdbc_chan, 'with-insert'"); return null; });
            step("commit", () -> { w.commit(); return null; });
            step("received", () -> received(listener, "with-insert"));
            step("insert 2", () -> st.executeUpdate("INSERT INTO jdbc_notify VALUES (2)"));
            step("notify in the transaction", () -> { st.execute("NOTIFY jdbc_chan, 'rolled-back'"); return null; });
            step("rollback", () -> { w.rollback(); return null; });
            w.setAutoCommit(true);
            step("pg_notify in autocommit", () -> {
                try (ResultSet rs = st.executeQuery("SELECT pg_notify('jdbc_chan', 'autocommit')")) {
                    return rs.next() ? "1 row" : "no row";
                }
            });
            step("received", () -> received(listener, "autocommit"));
            seenElsewhere("SELECT id FROM jdbc_notify ORDER BY id");
        }
    }

    /** Notifications that arrive until one carries {@code last}, or the wait ends. */
    static String received(Connection listener, String last) throws SQLException {
        List<String> got = new ArrayList<>();
        long deadline = System.currentTimeMillis() + NOTIFY_WAIT_MS;
        while (!got.contains("jdbc_chan:" + last)) {
            int left = (int) (deadline - System.currentTimeMillis());
            if (left <= 0) {
                got.add("(nothing more within " + NOTIFY_WAIT_MS + " ms)");
                break;
            }
            PGNotification[] ns = listener.unwrap(PGConnection.class).getNotifications(left);
            if (ns != null) {
                for (PGNotification n : ns) {
                    got.add(n.getName() + ":" + n.getParameter());
                }
            }
        }
        return got.toString();
    }

    static void fetchSize() throws Exception {
        try (Connection c = connect()) {
            table(c, "jdbc_fetch", "id int PRIMARY KEY");
            step("fill 1000", () -> {
                try (Statement st = c.createStatement()) {
                    return st.executeUpdate("INSERT INTO jdbc_fetch SELECT generate_series(1, 1000)");
                }
            });
            c.setAutoCommit(false);
            step("cursor read with fetch size 100", () -> {
                try (Statement st = c.createStatement()) {
                    st.setFetchSize(100);
                    long n = 0, sum = 0, last = 0;
                    boolean ordered = true;
                    try (ResultSet rs = st.executeQuery("SELECT id FROM jdbc_fetch ORDER BY id")) {
                        while (rs.next()) {
                            long id = rs.getLong(1);
                            ordered &= id > last;
                            last = id;
                            n++;
                            sum += id;
                            if (n == 500) {
                                // another statement on the same connection, mid-cursor
                                try (Statement st2 = c.createStatement()) {
                                    st2.executeUpdate("INSERT INTO jdbc_fetch VALUES (1001)");
                                }
                            }
                        }
                    }
                    return n + " rows, sum " + sum + ", ordered " + ordered;
                }
            });
            step("commit", () -> { c.commit(); return null; });
            c.setAutoCommit(true);
            step("fetch size in autocommit (no cursor)", () -> {
                try (Statement st = c.createStatement()) {
                    st.setFetchSize(10);
                    int n = 0;
                    try (ResultSet rs = st.executeQuery("SELECT id FROM jdbc_fetch")) {
                        while (rs.next()) {
                            n++;
                        }
                    }
                    return n + " rows";
                }
            });
            seenElsewhere("SELECT count(*), max(id) FROM jdbc_fetch");
        }
    }
}

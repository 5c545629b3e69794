/* A program with SQLite linked in statically (libsqlite3.a): the shape of a Python built
 * with its own SQLite (python.org and standalone builds link it into _sqlite3 or the
 * interpreter), its functions in .symtab only. Waits for a line on stdin, then makes the
 * calls Python's sqlite3 module makes for connect(), two execute()s and a statement that
 * does not compile, on the database file argv[1]; prints "done". */
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>

/* cursor.execute(sql, (value,)): prepare, bind_parameter_count, bind, step,
 * last_insert_rowid on success, extended_errcode on failure. */
static int execute(sqlite3 *db, const char *sql, int value) {
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, sql, (int)strlen(sql) + 1, &st, NULL);
    if (rc != SQLITE_OK) {
        sqlite3_extended_errcode(db);
        return rc;
    }
    if (sqlite3_bind_parameter_count(st) == 1) sqlite3_bind_int(st, 1, value);
    rc = sqlite3_step(st);
    if (rc == SQLITE_DONE || rc == SQLITE_ROW) {
        if (sqlite3_stmt_readonly(st) == 0) sqlite3_changes(db);
        sqlite3_last_insert_rowid(db);
        rc = SQLITE_OK;
    } else {
        sqlite3_extended_errcode(db);
    }
    sqlite3_finalize(st);
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    char go[16];
    if (!fgets(go, sizeof go, stdin)) return 2;
    sqlite3 *db = NULL;
    if (sqlite3_open_v2(argv[1], &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) != SQLITE_OK) return 3;
    if (execute(db, "CREATE TABLE IF NOT EXISTS t (n INTEGER)", 0) != SQLITE_OK) return 4;
    if (execute(db, "INSERT INTO t (n) VALUES (?)", 7) != SQLITE_OK) return 5;
    if (execute(db, "SELEC nothing", 0) == SQLITE_OK) return 6;
    sqlite3_close_v2(db);
    printf("done\n");
    fflush(stdout);
    return 0;
}

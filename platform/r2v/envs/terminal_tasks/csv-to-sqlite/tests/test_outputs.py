import sqlite3
def test_rows():
    con = sqlite3.connect("/app/people.db")
    rows = con.execute("SELECT name, age, city FROM people ORDER BY name").fetchall()
    assert rows == [('Alice', 41, 'Paris'), ('Bob', 74, 'Paris'), ('Carol', 23, 'Oslo'), ('Dave', 26, 'Lima'), ('Erin', 42, 'Lima'), ('Frank', 57, 'Kyiv'), ('Grace', 61, 'Lima'), ('Heidi', 58, 'Lima'), ('Ivan', 46, 'Oslo'), ('Judy', 22, 'Lima'), ('Mallory', 21, 'Oslo'), ('Oscar', 62, 'Lima')], rows
    assert {t for (t,) in con.execute("SELECT typeof(age) FROM people")} == {"integer"}


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")

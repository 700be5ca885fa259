def test_upper():
    assert open("/app/upper.txt").read().split() == ['BRAVO0', 'ECHO1', 'CHARLIE2', 'INDIA3', 'ECHO4', 'CHARLIE5', 'GOLF6', 'DELTA7', 'DELTA8', 'INDIA9', 'INDIA10', 'CHARLIE11', 'DELTA12', 'FOXTROT13', 'JULIET14', 'GOLF15', 'ALPHA16', 'INDIA17', 'FOXTROT18', 'DELTA19']


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")

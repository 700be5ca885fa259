def test_dedup():
    assert open("/app/deduped.csv").read().splitlines() == ['name,group', 'Mallory,1', 'Judy,2', 'Judy,1', 'Grace,3', 'Ivan,2', 'Erin,3', 'Bob,3', 'Frank,3', 'Grace,4', 'Heidi,4', 'Ivan,3', 'Oscar,2', 'Dave,2', 'Erin,1', 'Mallory,4', 'Ivan,1', 'Heidi,1', 'Erin,4', 'Oscar,1', 'Judy,4', 'Grace,2', 'Bob,4', 'Dave,1', 'Dave,4', 'Grace,1']


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")

import sys
sys.path.insert(0, "/app")
import stats
def test_mean():
    assert stats.mean([1, 2, 3, 4]) == 2.5
    assert stats.mean([5]) == 5
    assert stats.mean([2, 4, 9]) == 5
def test_median_still_ok():
    assert stats.median([4, 1, 3, 2]) == 2.5


if __name__ == "__main__":
    for _name, _fn in list(globals().items()):
        if _name.startswith("test_") and callable(_fn):
            _fn()
    print("all tests passed")

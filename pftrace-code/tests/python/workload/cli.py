import _recorder
_recorder.start()
from mypkg.sub import mod


def main(argv=None):
    result = mod.top_level(key=argv)
    return result


main()
_recorder.finish()

"""A bot that cannot be imported: the pool must back off and sessions must get 503."""

import a_module_that_does_not_exist  # noqa: F401


async def bot(args):
    pass

// Stand-in (see ../README.md): nothing of gloo's algorithms is used by tpp.
#pragma once

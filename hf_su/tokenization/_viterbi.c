/* BytePiece's segmentation (max-score Viterbi over UTF-8 bytes, or Viterbi sampling) as a small CPython extension.
 *
 * Same result as the reference package (bojone/bytepiece, `Tokenizer.encode`): every text is cut into chunks (a
 * line with its trailing newlines), and each chunk is split into the pieces whose summed float64 log-probabilities
 * are largest. Ties are broken like the reference's Aho-Corasick loop: for every end position the candidates are
 * compared in order of increasing start with a strict `>`, so the longest piece wins a tie.
 *
 * Why not the reference's automaton: it yields one Python tuple per match. Here the vocabulary is a double-array
 * trie walked forward from every byte (two array reads per byte of depth), and the dynamic programme runs on C
 * arrays with the GIL released, so Python threads segment different texts at the same time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------------------------
 * Double-array trie over bytes. The child of the node in slot `s` by byte `c` is slot `base[s] + c`, valid iff
 * `check` there is `s`. Free slots have check -1, the root (slot 0) has check -2. The arrays carry 256 slots of
 * padding past the last used base, so a lookup never needs a bounds test. */

/* Resize the array `ptr` to `cap` elements; on failure return -1 from the calling function (`ptr` unchanged). */
#define RESIZE_OR_FAIL(ptr, cap)                                       \
    do {                                                               \
        void *resized_ = realloc((ptr), (size_t)(cap) * sizeof(*(ptr))); \
        if (!resized_) return -1;                                      \
        (ptr) = resized_;                                              \
    } while (0)

typedef struct {
    int32_t base;
    int32_t check;
    int32_t piece; /* index into the vocabulary, or -1 when no piece ends here */
} Unit;

typedef struct {
    Unit *units;
    int32_t size;     /* allocated slots */
    int32_t *next;    /* free slots form a doubly linked list in slot order (heads at `free_head`) */
    int32_t *prev;
    int32_t free_head; /* first free slot, or -1 */
    int32_t free_tail;
    int32_t high;      /* one past the highest slot ever used */
} Builder;

static int builder_grow(Builder *b, int32_t size) {
    if (size <= b->size) return 0;
    int32_t new_size = b->size ? b->size : 1024;
    while (new_size < size) {
        if (new_size > INT32_MAX / 2) return -1;
        new_size *= 2;
    }
    RESIZE_OR_FAIL(b->units, new_size);
    RESIZE_OR_FAIL(b->next, new_size);
    RESIZE_OR_FAIL(b->prev, new_size);
    for (int32_t i = b->size; i < new_size; i++) {
        b->units[i].base = 0;
        b->units[i].check = -1;
        b->units[i].piece = -1;
        b->prev[i] = b->free_tail;
        b->next[i] = -1;
        if (b->free_tail >= 0) b->next[b->free_tail] = i; else b->free_head = i;
        b->free_tail = i;
    }
    b->size = new_size;
    return 0;
}

static void builder_take(Builder *b, int32_t slot, int32_t parent) {
    b->units[slot].check = parent;
    int32_t p = b->prev[slot], n = b->next[slot];
    if (p >= 0) b->next[p] = n; else b->free_head = n;
    if (n >= 0) b->prev[n] = p; else b->free_tail = p;
    if (slot + 1 > b->high) b->high = slot + 1;
}

typedef struct {
    const unsigned char **keys;
    const Py_ssize_t *lens;
    const int32_t *order; /* piece indices sorted by their bytes */
} Keys;

/* Place the subtree of the node in `slot`, whose keys are order[lo:hi) sharing their first `depth` bytes. Children
 * with fewer keys are placed by recursion and the child with the most keys by the loop, so the recursion is at most
 * log2(number of pieces) deep however long the pieces are. */
static int place(Builder *b, const Keys *k, int32_t slot, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t depth) {
    unsigned char labels[256];
    Py_ssize_t starts[257];
    for (;;) {
        if (lo < hi && k->lens[k->order[lo]] == depth) { /* the key that ends here sorts first */
            b->units[slot].piece = k->order[lo];
            lo++;
        }
        if (lo == hi) return 0;
        int n_labels = 0;
        for (Py_ssize_t i = lo; i < hi; i++) {
            unsigned char c = k->keys[k->order[i]][depth];
            if (n_labels == 0 || labels[n_labels - 1] != c) {
                labels[n_labels] = c;
                starts[n_labels++] = i;
            }
        }
        starts[n_labels] = hi;

        /* The first free slot that fits all labels; nodes with several children try a few, then take fresh space. */
        int32_t base = -1, candidate = b->free_head;
        for (int tries = 0; candidate >= 0 && tries < 64; tries++, candidate = b->next[candidate]) {
            int32_t offset = candidate - labels[0];
            if (offset < 1) continue;
            if (builder_grow(b, offset + 256 + 1) < 0) return -1;
            int fits = 1;
            for (int j = 1; j < n_labels && fits; j++) fits = b->units[offset + labels[j]].check == -1;
            if (fits) {
                base = offset;
                break;
            }
        }
        if (base < 0) base = b->high > 1 ? b->high : 1;
        if (builder_grow(b, base + 256 + 1) < 0) return -1;
        b->units[slot].base = base;
        int largest = 0;
        for (int j = 0; j < n_labels; j++) {
            builder_take(b, base + labels[j], slot);
            if (starts[j + 1] - starts[j] > starts[largest + 1] - starts[largest]) largest = j;
        }
        for (int j = 0; j < n_labels; j++) {
            if (j != largest && place(b, k, base + labels[j], starts[j], starts[j + 1], depth + 1) < 0) return -1;
        }
        slot = base + labels[largest];
        lo = starts[largest];
        hi = starts[largest + 1];
        depth++;
    }
}

static const Keys *sort_keys_context;

static int compare_keys(const void *x, const void *y) {
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    Py_ssize_t la = sort_keys_context->lens[a], lb = sort_keys_context->lens[b];
    int c = memcmp(sort_keys_context->keys[a], sort_keys_context->keys[b], (size_t)(la < lb ? la : lb));
    if (c) return c;
    return (la > lb) - (la < lb);
}

/* ---------------------------------------------------------------------------------------------------------------
 * The Segmenter type */

typedef struct {
    PyObject_HEAD
    Unit *units;
    int32_t size;
    double *scores;        /* per piece */
    PyObject **id_objects; /* per piece: its token id as a Python int, shared by all output lists */
    Py_ssize_t n_pieces;
} Segmenter;

static void Segmenter_dealloc(Segmenter *self) {
    free(self->units);
    free(self->scores);
    if (self->id_objects) {
        for (Py_ssize_t i = 0; i < self->n_pieces; i++) Py_XDECREF(self->id_objects[i]);
        free(self->id_objects);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Segmenter_init(Segmenter *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"pieces", "scores", "first_id", NULL};
    PyObject *pieces_arg, *scores_arg;
    int first_id = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|i", kwlist, &pieces_arg, &scores_arg, &first_id)) return -1;
    if (self->units) {
        PyErr_SetString(PyExc_RuntimeError, "Segmenter is already initialised");
        return -1;
    }
    PyObject *pieces = PySequence_Fast(pieces_arg, "pieces must be a sequence of bytes");
    if (!pieces) return -1;
    PyObject *scores = PySequence_Fast(scores_arg, "scores must be a sequence of floats");
    if (!scores) {
        Py_DECREF(pieces);
        return -1;
    }
    int status = -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(pieces);
    const unsigned char **keys = NULL;
    Py_ssize_t *lens = NULL;
    int32_t *order = NULL;
    double *piece_scores = NULL;
    PyObject **id_objects = NULL;
    Builder b = {NULL, 0, NULL, NULL, -1, -1, 1};

    if (PySequence_Fast_GET_SIZE(scores) != n) {
        PyErr_Format(PyExc_ValueError, "got %zd pieces but %zd scores", n, PySequence_Fast_GET_SIZE(scores));
        goto done;
    }
    if (n >= INT32_MAX - first_id || first_id < 0) {
        PyErr_SetString(PyExc_ValueError, "too many pieces or a negative first_id");
        goto done;
    }
    keys = malloc(sizeof(*keys) * (size_t)(n ? n : 1));
    lens = malloc(sizeof(*lens) * (size_t)(n ? n : 1));
    order = malloc(sizeof(*order) * (size_t)(n ? n : 1));
    piece_scores = malloc(sizeof(double) * (size_t)(n ? n : 1));
    id_objects = calloc((size_t)(n ? n : 1), sizeof(PyObject *));
    if (!keys || !lens || !order || !piece_scores || !id_objects) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *piece = PySequence_Fast_GET_ITEM(pieces, i);
        if (!PyBytes_Check(piece) || PyBytes_GET_SIZE(piece) == 0) {
            PyErr_Format(PyExc_ValueError, "piece %zd must be a non-empty bytes object", i);
            goto done;
        }
        keys[i] = (const unsigned char *)PyBytes_AS_STRING(piece);
        lens[i] = PyBytes_GET_SIZE(piece);
        order[i] = (int32_t)i;
        double score = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(scores, i));
        if (score == -1.0 && PyErr_Occurred()) goto done;
        if (!isfinite(score)) {
            PyErr_Format(PyExc_ValueError, "score of piece %zd is not finite", i);
            goto done;
        }
        piece_scores[i] = score;
        if (!(id_objects[i] = PyLong_FromSsize_t(first_id + i))) goto done;
    }
    Keys k = {keys, lens, order};
    sort_keys_context = &k; /* the GIL is held: no other thread sorts at the same time */
    qsort(order, (size_t)n, sizeof(int32_t), compare_keys);
    for (Py_ssize_t i = 1; i < n; i++) {
        if (compare_keys(&order[i - 1], &order[i]) == 0) {
            PyErr_Format(PyExc_ValueError, "pieces %d and %d are the same bytes", order[i - 1], order[i]);
            goto done;
        }
    }
    if (builder_grow(&b, 257) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    builder_take(&b, 0, -2);
    if (place(&b, &k, 0, 0, n, 0) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    self->units = b.units;
    self->size = b.size;
    self->scores = piece_scores;
    self->id_objects = id_objects;
    self->n_pieces = n;
    b.units = NULL;
    piece_scores = NULL;
    id_objects = NULL;
    status = 0;
done:
    free(b.units);
    free(piece_scores);
    if (id_objects) {
        for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(id_objects[i]);
        free(id_objects);
    }
    free(b.next);
    free(b.prev);
    free(keys);
    free(lens);
    free(order);
    Py_DECREF(pieces);
    Py_DECREF(scores);
    return status;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Segmentation (no Python objects touched: runs with the GIL released) */

typedef struct {
    int32_t *data;
    size_t len, cap;
} IdBuffer;

static int ids_reserve(IdBuffer *out, size_t extra) {
    if (out->len + extra <= out->cap) return 0;
    size_t cap = out->cap ? out->cap : 4096;
    while (cap < out->len + extra) cap *= 2;
    RESIZE_OR_FAIL(out->data, cap);
    out->cap = cap;
    return 0;
}

typedef struct {
    double *best;    /* best score of a segmentation of text[0:e] */
    int32_t *start;  /* start of the last piece of that segmentation */
    int32_t *piece;  /* and its piece index */
    double *mass;    /* sampling: summed edge weights into e, relative to exp(best[e]) */
    size_t cap;
    size_t failed_at; /* for the error message when a chunk cannot be segmented */
} Scratch;

static int scratch_reserve(Scratch *s, size_t n) {
    if (n <= s->cap) return 0;
    size_t cap = s->cap ? s->cap : 1024;
    while (cap < n) cap *= 2;
    RESIZE_OR_FAIL(s->best, cap);
    RESIZE_OR_FAIL(s->start, cap);
    RESIZE_OR_FAIL(s->piece, cap);
    RESIZE_OR_FAIL(s->mass, cap);
    s->cap = cap;
    return 0;
}

/* Sampling instead of the best path (alpha >= 0): a segmentation s is drawn with probability proportional to
 * prod over its pieces of p(piece)^alpha, as the reference does for alpha >= 0 ("perfect" Viterbi sampling). */
typedef struct {
    double alpha;
    uint64_t state; /* splitmix64 */
} Sampler;

static inline double next_uniform(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}

/* Append the piece indices of the best (or, with a sampler, a sampled) segmentation of one chunk. */
static int segment_chunk(const Segmenter *seg, const unsigned char *text, size_t n, Sampler *sampler, Scratch *s,
                         IdBuffer *out) {
    if (n > INT32_MAX - 1) return -2;
    if (scratch_reserve(s, n + 1) < 0 || ids_reserve(out, n) < 0) return -1;
    const Unit *units = seg->units;
    const double *scores = seg->scores;
    double *best = s->best; /* best score of a segmentation of text[0:e] (sampling: see mass) */
    int32_t *start = s->start, *piece = s->piece;
    if (n == 0) return 0;
    best[0] = 0.0;
    for (size_t e = 1; e <= n; e++) best[e] = -INFINITY;
    if (!sampler) {
        for (size_t i = 0; i < n; i++) {
            const double here = best[i];
            int32_t node = 0;
            for (size_t e = i; e < n; e++) {
                int32_t child = units[node].base + text[e];
                if (units[child].check != node) break;
                node = child;
                int32_t p = units[node].piece;
                if (p >= 0) {
                    double score = here + scores[p];
                    if (score > best[e + 1]) { /* strict: the earliest start (longest piece) keeps a tie */
                        best[e + 1] = score;
                        start[e + 1] = (int32_t)i;
                        piece[e + 1] = p;
                    }
                }
            }
        }
    } else {
        /* Forward filtering with a weighted reservoir: every end keeps the start of one incoming edge, replaced by
         * each new edge with probability weight / (total weight so far), so it ends up drawn in proportion to
         * Z[start] * p(piece)^alpha. Read back from the end, the path has the law above. The weights into an end
         * are summed in linear scale relative to the first one (best[] holds its log, mass[] the sum), so an edge
         * costs one exp and one uniform draw, and a position one log. */
        const double alpha = sampler->alpha;
        double *mass = s->mass;
        mass[0] = 1.0;
        for (size_t e = 1; e <= n; e++) mass[e] = 0.0;
        for (size_t i = 0; i < n; i++) {
            if (mass[i] == 0.0) continue; /* unreachable (only when a byte is not a piece) */
            const double here = best[i] + log(mass[i]); /* log Z of text[0:i], final: all edges into i are in */
            int32_t node = 0;
            for (size_t e = i; e < n; e++) {
                int32_t child = units[node].base + text[e];
                if (units[child].check != node) break;
                node = child;
                int32_t p = units[node].piece;
                if (p < 0) continue;
                double weight = here + alpha * scores[p];
                if (mass[e + 1] == 0.0) { /* the first edge into e is taken with probability 1 */
                    best[e + 1] = weight;
                    mass[e + 1] = 1.0;
                    start[e + 1] = (int32_t)i;
                    piece[e + 1] = p;
                    continue;
                }
                double shift = weight - best[e + 1];
                if (shift > 512.0) { /* rescale to the new edge before exp overflows */
                    mass[e + 1] *= exp(-shift);
                    best[e + 1] = weight;
                    shift = 0.0;
                }
                double w = exp(shift);
                mass[e + 1] += w;
                if (next_uniform(&sampler->state) * mass[e + 1] < w) {
                    start[e + 1] = (int32_t)i;
                    piece[e + 1] = p;
                }
            }
        }
    }
    if (best[n] == -INFINITY) { /* a byte that no piece covers (impossible when all 256 single bytes are pieces) */
        size_t e = 1;
        while (best[e] > -INFINITY) e++;
        s->failed_at = e - 1; /* no segmentation of the chunk gets past this byte */
        return -3;
    }
    /* read the path back from the end, then reverse it in place */
    size_t first = out->len;
    for (size_t e = n; e > 0; e = (size_t)start[e]) out->data[out->len++] = piece[e];
    for (size_t a = first, z = out->len - 1; a < z; a++, z--) {
        int32_t t = out->data[a];
        out->data[a] = out->data[z];
        out->data[z] = t;
    }
    return 0;
}

/* A chunk is a line with its trailing newlines, or the text's last line without one; without `lines` the whole
 * text is one chunk. */
static int segment_text(const Segmenter *seg, const unsigned char *text, size_t n, int lines, Sampler *sampler,
                        Scratch *s, IdBuffer *out) {
    size_t pos = 0;
    while (pos < n) {
        size_t end = n;
        if (lines) {
            const unsigned char *newline = memchr(text + pos, '\n', n - pos);
            end = newline ? (size_t)(newline - text) : n;
            while (end < n && text[end] == '\n') end++;
        }
        int status = segment_chunk(seg, text + pos, end - pos, sampler, s, out);
        if (status == -3) s->failed_at += pos;
        if (status) return status;
        pos = end;
    }
    return 0;
}

PyDoc_STRVAR(Segmenter_encode_doc,
             "encode(texts, lines=True)\n--\n\n"
             "Token ids of the best segmentation of each UTF-8 text (a list of bytes objects), one list per text.\n"
             "With lines=True each line (with its trailing newlines) is segmented on its own, as BytePiece does;\n"
             "with lines=False each text is segmented whole. The GIL is released while segmenting, so threads may\n"
             "call this at the same time. ValueError if a byte is covered by no piece.");

PyDoc_STRVAR(Segmenter_sample_doc,
             "sample(texts, alpha, seeds, lines=True)\n--\n\n"
             "Like encode, but each text's segmentation is drawn with probability proportional to the product of\n"
             "p(piece)**alpha over its pieces (alpha >= 0; 0 is uniform over segmentations). Text t uses a random\n"
             "stream seeded by seeds[t] (an int), so results do not depend on how texts are grouped or threaded.");

/* Segment every text (alpha < 0: best paths; else sampled, text t with the generator seeded by seeds[t]). */
static PyObject *segment_texts(Segmenter *self, PyObject *texts_arg, int lines, double alpha, PyObject *seeds_arg) {
    if (!self->units) {
        PyErr_SetString(PyExc_RuntimeError, "Segmenter is not initialised");
        return NULL;
    }
    PyObject *texts = PySequence_Fast(texts_arg, "texts must be a list of bytes");
    if (!texts) return NULL;
    Py_ssize_t n_texts = PySequence_Fast_GET_SIZE(texts);
    PyObject **items = PySequence_Fast_ITEMS(texts);
    PyObject *result = NULL, *seeds = NULL;
    uint64_t *seed_values = NULL;
    size_t *bounds = malloc(sizeof(size_t) * (size_t)(n_texts + 1));
    /* own a reference to every text: the list may change while the GIL is released */
    PyObject **held = malloc(sizeof(PyObject *) * (size_t)(n_texts ? n_texts : 1));
    IdBuffer out = {NULL, 0, 0};
    Scratch scratch = {NULL, NULL, NULL, NULL, 0, 0};
    Py_ssize_t n_held = 0;
    if (!bounds || !held) {
        PyErr_NoMemory();
        goto done;
    }
    if (alpha >= 0) {
        seeds = PySequence_Fast(seeds_arg, "seeds must be a sequence of ints");
        if (!seeds) goto done;
        if (PySequence_Fast_GET_SIZE(seeds) != n_texts) {
            PyErr_Format(PyExc_ValueError, "got %zd texts but %zd seeds", n_texts, PySequence_Fast_GET_SIZE(seeds));
            goto done;
        }
        if (!(seed_values = malloc(sizeof(uint64_t) * (size_t)(n_texts ? n_texts : 1)))) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t t = 0; t < n_texts; t++) {
            PyObject *seed = PySequence_Fast_GET_ITEM(seeds, t);
            if (!PyLong_Check(seed)) {
                PyErr_Format(PyExc_TypeError, "seeds[%zd] must be an int, got %s", t, Py_TYPE(seed)->tp_name);
                goto done;
            }
            seed_values[t] = (uint64_t)PyLong_AsUnsignedLongLongMask(seed);
            if (PyErr_Occurred()) goto done;
        }
    }
    for (; n_held < n_texts; n_held++) {
        if (!PyBytes_Check(items[n_held])) {
            PyErr_Format(PyExc_TypeError, "texts[%zd] must be bytes, got %s", n_held, Py_TYPE(items[n_held])->tp_name);
            goto done;
        }
        Py_INCREF(items[n_held]);
        held[n_held] = items[n_held];
    }
    int status = 0;
    Py_ssize_t t = 0;
    Py_BEGIN_ALLOW_THREADS
    bounds[0] = 0;
    for (; t < n_texts; t++) {
        Sampler sampler = {alpha, alpha >= 0 ? seed_values[t] : 0};
        status = segment_text(self, (const unsigned char *)PyBytes_AS_STRING(held[t]),
                              (size_t)PyBytes_GET_SIZE(held[t]), lines, alpha >= 0 ? &sampler : NULL, &scratch, &out);
        if (status) break;
        bounds[t + 1] = out.len;
    }
    Py_END_ALLOW_THREADS
    if (status == -3) {
        unsigned char byte = (unsigned char)PyBytes_AS_STRING(held[t])[scratch.failed_at];
        char message[160]; /* PyErr_Format has no zero-padded hex */
        snprintf(message, sizeof message, "texts[%zd] cannot be segmented: no piece covers byte 0x%02X at offset %zu",
                 t, byte, scratch.failed_at);
        PyErr_SetString(PyExc_ValueError, message);
        goto done;
    }
    if (status == -2) {
        PyErr_SetString(PyExc_ValueError, "a line of over 2**31 bytes is too long to segment");
        goto done;
    }
    if (status) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyList_New(n_texts);
    if (!result) goto done;
    for (Py_ssize_t t = 0; t < n_texts; t++) {
        PyObject *ids = PyList_New((Py_ssize_t)(bounds[t + 1] - bounds[t]));
        if (!ids) {
            Py_CLEAR(result);
            goto done;
        }
        for (size_t j = bounds[t]; j < bounds[t + 1]; j++) {
            PyObject *id = self->id_objects[out.data[j]];
            Py_INCREF(id);
            PyList_SET_ITEM(ids, (Py_ssize_t)(j - bounds[t]), id);
        }
        PyList_SET_ITEM(result, t, ids);
    }
done:
    for (Py_ssize_t t = 0; t < n_held; t++) Py_DECREF(held[t]);
    free(held);
    free(bounds);
    free(out.data);
    free(scratch.best);
    free(scratch.start);
    free(scratch.piece);
    free(scratch.mass);
    free(seed_values);
    Py_XDECREF(seeds);
    Py_DECREF(texts);
    return result;
}

static PyObject *Segmenter_encode(Segmenter *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"texts", "lines", NULL};
    PyObject *texts;
    int lines = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|p", kwlist, &texts, &lines)) return NULL;
    return segment_texts(self, texts, lines, -1.0, NULL);
}

static PyObject *Segmenter_sample(Segmenter *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"texts", "alpha", "seeds", "lines", NULL};
    PyObject *texts, *seeds;
    double alpha;
    int lines = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OdO|p", kwlist, &texts, &alpha, &seeds, &lines)) return NULL;
    if (!(alpha >= 0) || !isfinite(alpha)) {
        char message[96]; /* PyErr_Format has no %g */
        snprintf(message, sizeof message, "alpha must be finite and >= 0 for sampling, got %g", alpha);
        PyErr_SetString(PyExc_ValueError, message);
        return NULL;
    }
    return segment_texts(self, texts, lines, alpha, seeds);
}



static PyObject *Segmenter_get_size(Segmenter *self, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(self->n_pieces);
}

static PyMethodDef Segmenter_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))Segmenter_encode, METH_VARARGS | METH_KEYWORDS, Segmenter_encode_doc},
    {"sample", (PyCFunction)(void (*)(void))Segmenter_sample, METH_VARARGS | METH_KEYWORDS, Segmenter_sample_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Segmenter_getset[] = {
    {"num_pieces", (getter)Segmenter_get_size, NULL, "number of pieces in the vocabulary", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Segmenter_doc,
             "Segmenter(pieces, scores, first_id=0)\n--\n\n"
             "BytePiece's deterministic Viterbi segmentation over a fixed vocabulary.\n\n"
             "pieces: the bytes of every piece (include all 256 single bytes so that every text can be segmented);\n"
             "scores: their float64 log-probabilities; piece i has token id first_id + i.");

static PyTypeObject SegmenterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hf_su.tokenization._viterbi.Segmenter",
    .tp_basicsize = sizeof(Segmenter),
    .tp_dealloc = (destructor)Segmenter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = Segmenter_doc,
    .tp_methods = Segmenter_methods,
    .tp_getset = Segmenter_getset,
    .tp_init = (initproc)Segmenter_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef viterbi_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "hf_su.tokenization._viterbi",
    .m_doc = "BytePiece's deterministic Viterbi segmentation in C (see hf_su.tokenization.bytepiece).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__viterbi(void) {
    if (PyType_Ready(&SegmenterType) < 0) return NULL;
    PyObject *module = PyModule_Create(&viterbi_module);
    if (!module) return NULL;
    Py_INCREF(&SegmenterType);
    if (PyModule_AddObject(module, "Segmenter", (PyObject *)&SegmenterType) < 0) {
        Py_DECREF(&SegmenterType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

/*
 * polyline-simplify: Douglas-Peucker simplification of a 2-D polyline.
 *
 * The routine a CAD program runs before exporting a digitised contour: keep
 * the fewest vertices such that no dropped vertex lies farther than
 * `epsilon` from the simplified line.  Freestanding C (no libc), compiled to
 * a wasm32 module that speaks the optogate wasm ABI (docs/vendor-guide.md):
 *
 *   og_alloc(size) -> ptr                 host copies params and data in
 *   og_run(params, plen, data, dlen) -> status   0 ok, 1 user error
 *   og_result_ptr() / og_result_len()     JSON result, or the error message
 *   og_output_ptr() / og_output_len()     binary output
 *
 * params: {"epsilon": <number >= 0>}
 * data:   the polyline, n points as little-endian float64 pairs (x, y)
 * output: the kept points, same encoding, first and last always kept
 * result: {"points_in": n, "points_out": m}
 *
 * The recursion of the textbook algorithm is replaced by an explicit stack
 * of index ranges allocated on the heap, so a polyline of a million points
 * cannot overflow the 64 KiB wasm shadow stack.
 */

typedef unsigned int u32;
typedef unsigned char u8;
typedef unsigned long size_t;

extern u8 __heap_base;

#define PAGE_SIZE 65536u
#define STATUS_OK 0
#define STATUS_USER_ERROR 1

static u32 heap_top;
static const char *result_ptr;
static u32 result_len;
static const u8 *output_ptr;
static u32 output_len;

/* The compiler may emit calls to these for struct copies and loops. */
void *memset(void *dst, int c, size_t n) {
    u8 *d = dst;
    while (n--) *d++ = (u8)c;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n) {
    u8 *d = dst;
    const u8 *s = src;
    while (n--) *d++ = *s++;
    return dst;
}

/* Bump allocator: every call gets fresh memory; the host instantiates the
 * module anew for each invocation, so nothing is ever freed. */
__attribute__((export_name("og_alloc"))) u32 og_alloc(u32 size) {
    if (heap_top == 0) heap_top = (u32)&__heap_base;
    u32 start = (heap_top + 7u) & ~7u;
    if (size > 0xFFFFFFFFu - start) return 0;
    u32 end = start + size;
    u32 have = (u32)__builtin_wasm_memory_size(0) * PAGE_SIZE;
    if (end > have) {
        u32 pages = (end - have + PAGE_SIZE - 1) / PAGE_SIZE;
        if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) return 0;
    }
    heap_top = end;
    return start;
}

__attribute__((export_name("og_result_ptr"))) u32 og_result_ptr(void) { return (u32)result_ptr; }
__attribute__((export_name("og_result_len"))) u32 og_result_len(void) { return result_len; }
__attribute__((export_name("og_output_ptr"))) u32 og_output_ptr(void) { return (u32)output_ptr; }
__attribute__((export_name("og_output_len"))) u32 og_output_len(void) { return output_len; }

static u32 str_len(const char *s) {
    u32 n = 0;
    while (s[n]) n++;
    return n;
}

static int fail(const char *message) {
    result_ptr = message;
    result_len = str_len(message);
    output_len = 0;
    return STATUS_USER_ERROR;
}

/* Find "key" in a JSON object and return the offset just past its ':' or -1.
 * The params are validated against the manifest's schema by the gateway, so
 * a flat scan is enough; it still never reads outside the buffer. */
static long find_key(const char *json, u32 len, const char *key) {
    u32 klen = str_len(key);
    for (u32 i = 0; i + klen + 2 <= len; i++) {
        if (json[i] != '"') continue;
        u32 j = 0;
        while (j < klen && json[i + 1 + j] == key[j]) j++;
        if (j != klen || json[i + 1 + klen] != '"') continue;
        u32 k = i + klen + 2;
        while (k < len && (json[k] == ' ' || json[k] == '\t' || json[k] == '\n' || json[k] == '\r')) k++;
        if (k < len && json[k] == ':') return (long)k + 1;
    }
    return -1;
}

/* Powers of ten that are exact doubles (10^22 is the largest). */
static const double POW10[23] = {
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};
#define EXACT_MANTISSA (1ull << 53)
#define MANTISSA_DIGITS_CAP 100000000000000000ull /* keep 17 significant digits */

/* Parse a JSON number at json[pos..len); returns 0 on success.
 * Digits are gathered into an integer mantissa and a decimal exponent; when
 * the mantissa fits 53 bits and the exponent is within +-22 the result is
 * one correctly rounded multiplication or division by an exact power of ten
 * (Clinger's fast path), which covers every tolerance a person types
 * ("0.05", "1e-3").  Otherwise it is scaled step by step (close, not exact). */
static int parse_number(const char *json, u32 len, u32 pos, double *out) {
    while (pos < len && (json[pos] == ' ' || json[pos] == '\t' || json[pos] == '\n' || json[pos] == '\r')) pos++;
    unsigned long long mantissa = 0;
    int exp10 = 0, digits = 0, negative = 0;
    if (pos < len && json[pos] == '-') { negative = 1; pos++; }
    while (pos < len && json[pos] >= '0' && json[pos] <= '9') {
        if (mantissa < MANTISSA_DIGITS_CAP) mantissa = mantissa * 10u + (unsigned)(json[pos] - '0');
        else exp10++;
        pos++; digits++;
    }
    if (pos < len && json[pos] == '.') {
        pos++;
        while (pos < len && json[pos] >= '0' && json[pos] <= '9') {
            if (mantissa < MANTISSA_DIGITS_CAP) { mantissa = mantissa * 10u + (unsigned)(json[pos] - '0'); exp10--; }
            pos++; digits++;
        }
    }
    if (!digits) return 1;
    if (pos < len && (json[pos] == 'e' || json[pos] == 'E')) {
        int esign = 1, e = 0, edigits = 0;
        pos++;
        if (pos < len && (json[pos] == '+' || json[pos] == '-')) { if (json[pos] == '-') esign = -1; pos++; }
        while (pos < len && json[pos] >= '0' && json[pos] <= '9') { if (e < 1000) e = e * 10 + (json[pos] - '0'); pos++; edigits++; }
        if (!edigits) return 1;
        exp10 += esign * e;
    }
    double value = (double)mantissa;
    if (mantissa <= EXACT_MANTISSA && exp10 >= -22 && exp10 <= 22) {
        value = exp10 < 0 ? value / POW10[-exp10] : value * POW10[exp10];
    } else {
        for (; exp10 > 0 && value < 1e308; exp10--) value *= 10.0;
        for (; exp10 < 0 && value > 0.0; exp10++) value /= 10.0;
    }
    *out = negative ? -value : value;
    return 0;
}

static u32 put_uint(char *dst, u32 value) {
    char tmp[10];
    u32 n = 0, i = 0;
    do { tmp[n++] = (char)('0' + value % 10u); value /= 10u; } while (value);
    while (n) dst[i++] = tmp[--n];
    return i;
}

static u32 put_str(char *dst, const char *s) {
    u32 i = 0;
    while (s[i]) { dst[i] = s[i]; i++; }
    return i;
}

static double load_f64(const u8 *p) {
    union { double d; u8 b[8]; } u;
    for (int i = 0; i < 8; i++) u.b[i] = p[i];  /* wasm is little-endian */
    return u.d;
}

static double fabs_(double v) { return v < 0 ? -v : v; }

/* Squared distance from p to the segment a-b, scaled by |ab|^2 when a != b
 * (compared against epsilon^2 * |ab|^2 to avoid a square root per point). */
static double dist2_segment(double px, double py, double ax, double ay, double bx, double by) {
    double dx = bx - ax, dy = by - ay;
    double len2 = dx * dx + dy * dy;
    if (len2 == 0.0) {
        double ex = px - ax, ey = py - ay;
        return ex * ex + ey * ey;
    }
    double t = ((px - ax) * dx + (py - ay) * dy) / len2;
    if (t < 0.0) t = 0.0;
    if (t > 1.0) t = 1.0;
    double cx = ax + t * dx - px, cy = ay + t * dy - py;
    return cx * cx + cy * cy;
}

__attribute__((export_name("og_run")))
int og_run(const char *params, u32 params_len, const u8 *data, u32 data_len) {
    long at = find_key(params, params_len, "epsilon");
    double epsilon;
    if (at < 0 || parse_number(params, params_len, (u32)at, &epsilon))
        return fail("params.epsilon must be a number");
    if (epsilon < 0.0 || epsilon != epsilon) return fail("params.epsilon must be >= 0");
    if (data_len % 16u) return fail("data must be (x, y) pairs of little-endian float64");
    u32 n = data_len / 16u;
    for (u32 i = 0; i < 2 * n; i++) {
        double v = load_f64(data + 8u * i);
        if (v != v || fabs_(v) > 1.0e300) return fail("data holds a NaN or infinite coordinate");
    }

    u8 *keep = (u8 *)og_alloc(n ? n : 1);
    u32 *stack = (u32 *)og_alloc(2u * 4u * (n ? n : 1));
    char *json = (char *)og_alloc(64);
    if (!keep || !stack || !json) return fail("polyline too large for the memory limit");
    memset(keep, 0, n);

    u32 kept = 0;
    if (n > 0) {
        keep[0] = keep[n - 1] = 1;
        u32 top = 0;
        if (n > 2) { stack[top++] = 0; stack[top++] = n - 1; }
        double eps2 = epsilon * epsilon;
        while (top) {
            u32 last = stack[--top], first = stack[--top];
            double ax = load_f64(data + 16u * first), ay = load_f64(data + 16u * first + 8u);
            double bx = load_f64(data + 16u * last), by = load_f64(data + 16u * last + 8u);
            double worst = -1.0;
            u32 index = first;
            for (u32 i = first + 1; i < last; i++) {
                double d = dist2_segment(load_f64(data + 16u * i), load_f64(data + 16u * i + 8u), ax, ay, bx, by);
                if (d > worst) { worst = d; index = i; }
            }
            if (worst > eps2) {
                keep[index] = 1;
                if (index - first > 1) { stack[top++] = first; stack[top++] = index; }
                if (last - index > 1) { stack[top++] = index; stack[top++] = last; }
            }
        }
        for (u32 i = 0; i < n; i++) kept += keep[i];
    }

    u8 *out = (u8 *)og_alloc(16u * (kept ? kept : 1));
    if (!out) return fail("polyline too large for the memory limit");
    u32 o = 0;
    for (u32 i = 0; i < n; i++)
        if (keep[i]) { memcpy(out + 16u * o, data + 16u * i, 16); o++; }

    u32 j = 0;
    j += put_str(json + j, "{\"points_in\":");
    j += put_uint(json + j, n);
    j += put_str(json + j, ",\"points_out\":");
    j += put_uint(json + j, kept);
    json[j++] = '}';
    result_ptr = json;
    result_len = j;
    output_ptr = out;
    output_len = 16u * kept;
    return STATUS_OK;
}

/* The geometry of a convolution or pooling window, shared by direct_conv.h and pooling.h
 * (and by the Cython kernels of conv.pyx, as Geometry):
 * (C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w), as ghess.nn._window. */
#ifndef GHESS_GEOMETRY_H
#define GHESS_GEOMETRY_H

typedef struct {
    int C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w;
} ghess_dc_geom;

#endif
